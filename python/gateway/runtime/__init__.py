"""The only place that knows which mode runs: builds stores, admission, feed and change bus."""
