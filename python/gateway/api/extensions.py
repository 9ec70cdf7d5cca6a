"""Imports every module that registers extra routes or lifecycle hooks with `gateway.api.app`."""
