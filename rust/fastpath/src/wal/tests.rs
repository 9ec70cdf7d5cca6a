use super::*;
use std::fs::OpenOptions;
use std::io::Write;
use std::time::Duration;

fn cfg(dir: &Path) -> WriterConfig {
    WriterConfig {
        dir: dir.to_path_buf(),
        fsync_interval_us: 100,
        batch_records_max: 64,
        segment_bytes_max: 4096,
        pending_records_max: 10_000,
        fsync_behind: false,
        fsync_fault_delay: Duration::ZERO,
        fsync_fault_every: Duration::ZERO,
    }
}

fn write_records(dir: &Path, n: usize) -> u64 {
    let rec = recover(dir, |_, _| {}).unwrap();
    let w = WalWriter::open(cfg(dir), rec.next_lsn, rec.tail_segment).unwrap();
    let mut last = 0;
    for i in 0..n {
        last = w.append(format!("record-{i:05}").as_bytes()).unwrap();
        if i % 25 == 24 {
            // Separate batches, so that segment rotation (checked per batch) happens.
            assert!(w.wait_committed(last, Duration::from_secs(5)));
        }
    }
    assert!(w.wait_committed(last, Duration::from_secs(5)));
    w.close();
    last
}

fn read_all(dir: &Path) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    recover(dir, |lsn, p| out.push((lsn, p.to_vec()))).unwrap();
    out
}

#[test]
fn appended_records_survive_reopen_in_order_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(write_records(dir.path(), 500), 500);
    assert!(
        list_segments(dir.path()).unwrap().len() > 1,
        "segment_bytes_max forces rotation"
    );
    assert_eq!(write_records(dir.path(), 10), 510);
    let all = read_all(dir.path());
    assert_eq!(all.len(), 510);
    assert!(all
        .iter()
        .enumerate()
        .all(|(i, (lsn, _))| *lsn == i as u64 + 1));
    assert_eq!(all[0].1, b"record-00000");
}

#[test]
fn torn_tail_is_truncated_and_appends_resume_after_it() {
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 20);
    let (_, last) = list_segments(dir.path()).unwrap().pop().unwrap();
    let len = std::fs::metadata(&last).unwrap().len();
    // Simulate a crash mid-write: half a record header plus garbage length.
    let mut f = OpenOptions::new().append(true).open(&last).unwrap();
    f.write_all(&[0xff, 0xff, 0x00, 0x00, 1, 2, 3]).unwrap();
    drop(f);
    let rec = recover(dir.path(), |_, _| {}).unwrap();
    assert_eq!(rec.next_lsn, 21);
    assert_eq!(rec.truncated_bytes, 7);
    assert_eq!(std::fs::metadata(&last).unwrap().len(), len);
    write_records(dir.path(), 5);
    assert_eq!(read_all(dir.path()).len(), 25);
}

#[test]
fn read_only_scan_leaves_a_torn_tail_in_place() {
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 4);
    let (_, last) = list_segments(dir.path()).unwrap().pop().unwrap();
    let mut f = OpenOptions::new().append(true).open(&last).unwrap();
    f.write_all(&[9, 9, 9]).unwrap();
    drop(f);
    let len = std::fs::metadata(&last).unwrap().len();
    let r = scan_read_only(dir.path(), |_, _| {}).unwrap();
    assert_eq!((r.records, r.next_lsn, r.truncated_bytes), (4, 5, 3));
    assert_eq!(std::fs::metadata(&last).unwrap().len(), len);
}

#[test]
fn partially_written_last_record_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 3);
    let (_, last) = list_segments(dir.path()).unwrap().pop().unwrap();
    let len = std::fs::metadata(&last).unwrap().len();
    let f = OpenOptions::new().write(true).open(&last).unwrap();
    f.set_len(len - 3).unwrap();
    let all = read_all(dir.path());
    assert_eq!(all.len(), 2, "the record cut short was never acknowledged");
    assert_eq!(recover(dir.path(), |_, _| {}).unwrap().next_lsn, 3);
}

#[test]
fn corruption_before_valid_records_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 5);
    let (_, last) = list_segments(dir.path()).unwrap().pop().unwrap();
    let mut data = std::fs::read(&last).unwrap();
    // Flip a payload byte of the first record: later records are intact, so this is not a torn tail.
    data[SEGMENT_MAGIC.len() + HEADER_BYTES] ^= 0x55;
    std::fs::write(&last, &data).unwrap();
    match recover(dir.path(), |_, _| {}) {
        Err(WalError::Corrupt { reason, .. }) => assert!(reason.contains("checksum")),
        other => panic!("expected corruption error, got {other:?}"),
    }
}

#[test]
fn corruption_in_a_sealed_segment_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 500);
    let segs = list_segments(dir.path()).unwrap();
    let first = &segs[0].1;
    let mut data = std::fs::read(first).unwrap();
    let n = data.len();
    data[n - 2] ^= 0x01;
    std::fs::write(first, &data).unwrap();
    assert!(matches!(
        recover(dir.path(), |_, _| {}),
        Err(WalError::Corrupt { .. })
    ));
}

#[test]
fn reader_follows_commits_and_segments() {
    let dir = tempfile::tempdir().unwrap();
    let rec = recover(dir.path(), |_, _| {}).unwrap();
    let w = WalWriter::open(cfg(dir.path()), rec.next_lsn, rec.tail_segment).unwrap();
    let mut reader = WalReader::new(dir.path(), 0);
    let mut seen = Vec::new();
    for round in 0..5 {
        let mut last = 0;
        for i in 0..100 {
            last = w.append(format!("r{round}-{i}").as_bytes()).unwrap();
        }
        assert!(w.wait_committed(last, Duration::from_secs(5)));
        loop {
            let batch = reader.read(w.committed_lsn(), 37).unwrap();
            if batch.is_empty() {
                break;
            }
            seen.extend(batch);
        }
    }
    assert_eq!(seen.len(), 500);
    assert!(seen
        .iter()
        .enumerate()
        .all(|(i, (lsn, _))| *lsn == i as u64 + 1));
    let mut from_middle = WalReader::new(dir.path(), 250);
    let batch = from_middle.read(w.committed_lsn(), 10).unwrap();
    assert_eq!(batch[0].0, 251);
    assert_eq!(batch[0].1, b"r2-50");
}

#[test]
fn group_commit_batches_concurrent_appends() {
    let dir = tempfile::tempdir().unwrap();
    let rec = recover(dir.path(), |_, _| {}).unwrap();
    let mut c = cfg(dir.path());
    c.segment_bytes_max = 1 << 30;
    c.fsync_interval_us = 2000;
    let w = std::sync::Arc::new(WalWriter::open(c, rec.next_lsn, rec.tail_segment).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let w = w.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    let lsn = w.append(format!("{t}-{i}").as_bytes()).unwrap();
                    assert!(w.wait_committed(lsn, Duration::from_secs(5)));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = w.stats();
    assert_eq!(w.committed_lsn(), 400);
    assert!(
        stats.fsync_ns.count() < 400,
        "{} fsyncs for 400 records",
        stats.fsync_ns.count()
    );
}

#[test]
fn full_queue_is_refused_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let rec = recover(dir.path(), |_, _| {}).unwrap();
    let mut c = cfg(dir.path());
    c.pending_records_max = 3;
    c.fsync_interval_us = 1_000_000;
    c.batch_records_max = 1000;
    let w = WalWriter::open(c, rec.next_lsn, rec.tail_segment).unwrap();
    for _ in 0..3 {
        w.append(b"x").unwrap();
    }
    assert!(matches!(w.append(b"x"), Err(AppendError::Full)));
    w.close();
    assert_eq!(read_all(dir.path()).len(), 3);
}

#[test]
fn retention_removes_only_old_sealed_segments_at_or_below_the_safe_lsn() {
    let dir = tempfile::tempdir().unwrap();
    let last = write_records(dir.path(), 2000);
    let before = list_segments(dir.path()).unwrap();
    assert!(before.len() >= 4, "{} segments", before.len());
    let r = RetentionConfig {
        dir: dir.path().to_path_buf(),
        retention: Duration::from_secs(3600),
        archive_dir: None,
    };
    let now = std::time::SystemTime::now();
    assert_eq!(apply_retention(&r, last, now).unwrap(), 0, "too young");
    let later = now + Duration::from_secs(7200);
    let safe = before[2].0 - 1; // the first two segments are materialised, the rest not yet
    assert_eq!(apply_retention(&r, safe, later).unwrap(), 2);
    let after = list_segments(dir.path()).unwrap();
    assert_eq!(after[0].0, before[2].0);
    // Recovery and readers start at the oldest record held; nothing after it is lost.
    let rec = recover(dir.path(), |_, _| {}).unwrap();
    assert_eq!((rec.first_lsn, rec.next_lsn), (before[2].0, last + 1));
    let mut reader = WalReader::new(dir.path(), 0);
    let got = reader.read(last, 100_000).unwrap();
    assert_eq!(got.first().unwrap().0, before[2].0);
    assert_eq!(got.last().unwrap().0, last);
    // The tail segment never goes, whatever the safe LSN.
    assert_eq!(
        apply_retention(&r, u64::MAX, later).unwrap(),
        after.len() - 1
    );
    assert_eq!(list_segments(dir.path()).unwrap().len(), 1);
}

#[test]
fn retention_moves_segments_to_the_archive_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let archive = tempfile::tempdir().unwrap();
    let last = write_records(dir.path(), 600);
    let n = list_segments(dir.path()).unwrap().len();
    let r = RetentionConfig {
        dir: dir.path().to_path_buf(),
        retention: Duration::from_secs(0),
        archive_dir: Some(archive.path().to_path_buf()),
    };
    let moved = apply_retention(&r, last, std::time::SystemTime::now()).unwrap();
    assert_eq!(moved, n - 1);
    assert_eq!(list_segments(archive.path()).unwrap().len(), n - 1);
}

#[test]
fn recovery_after_a_checkpoint_skips_the_segments_it_covers() {
    let dir = tempfile::tempdir().unwrap();
    let last = write_records(dir.path(), 2000);
    let segments = list_segments(dir.path()).unwrap();
    let checkpoint = segments[3].0 - 1;
    // Damage a covered segment's body: recovery after the checkpoint does not even read it.
    let covered = &segments[1].1;
    let mut data = std::fs::read(covered).unwrap();
    data[20] ^= 0xff;
    std::fs::write(covered, &data).unwrap();
    let mut seen = Vec::new();
    let rec = recover_after(dir.path(), checkpoint, |lsn, _| seen.push(lsn)).unwrap();
    assert_eq!(rec.next_lsn, last + 1);
    assert_eq!(seen.first(), Some(&(checkpoint + 1)));
    assert_eq!(seen.len() as u64, last - checkpoint);
    assert!(
        recover(dir.path(), |_, _| {}).is_err(),
        "a full scan still finds the damage"
    );
}

fn behind_cfg(dir: &Path, delay_ms: u64) -> WriterConfig {
    WriterConfig {
        fsync_behind: true,
        fsync_fault_delay: Duration::from_millis(delay_ms),
        ..cfg(dir)
    }
}

#[test]
fn fsync_behind_publishes_written_records_before_a_stalled_fsync_commits_them() {
    let dir = tempfile::tempdir().unwrap();
    let rec = recover(dir.path(), |_, _| {}).unwrap();
    let w = WalWriter::open(behind_cfg(dir.path(), 400), rec.next_lsn, rec.tail_segment).unwrap();
    let mut last = 0;
    for i in 0..200 {
        last = w.append(format!("record-{i:05}").as_bytes()).unwrap();
        if i % 25 == 24 {
            // Separate batches, so that segment rotation (checked per batch) happens.
            assert!(w.wait_written(last, Duration::from_millis(300)));
        }
    }
    // The disk "stalls" 400 ms per fsync: the records are readable, not yet committed.
    assert!(w.committed_lsn() < last);
    let mut reader = WalReader::new(dir.path(), 0);
    let mut read = Vec::new();
    while read.len() < 200 {
        let batch = reader.read(w.written_lsn(), 1000).unwrap();
        assert!(!batch.is_empty(), "every written record is readable");
        read.extend(batch);
    }
    assert_eq!(read.last().unwrap().0, last);
    assert!(w.wait_committed(last, Duration::from_secs(10)));
    assert!(
        list_segments(dir.path()).unwrap().len() > 1,
        "segments rotate behind too"
    );
    w.close();
    assert_eq!(read_all(dir.path()).len(), 200);
}

#[test]
fn fsync_behind_close_makes_everything_written_durable() {
    let dir = tempfile::tempdir().unwrap();
    let rec = recover(dir.path(), |_, _| {}).unwrap();
    let w = WalWriter::open(behind_cfg(dir.path(), 50), rec.next_lsn, rec.tail_segment).unwrap();
    let mut last = 0;
    for i in 0..50 {
        last = w.append(format!("r{i}").as_bytes()).unwrap();
    }
    w.close();
    assert_eq!(w.committed_lsn(), last);
    assert_eq!(w.written_lsn(), last);
    assert!(!w.wait_committed(last + 1, Duration::from_millis(10)));
    let rec = recover(dir.path(), |_, _| {}).unwrap();
    assert_eq!(rec.next_lsn, last + 1);
}

#[test]
fn fsync_behind_bounds_the_records_written_and_not_yet_fsynced() {
    let dir = tempfile::tempdir().unwrap();
    let rec = recover(dir.path(), |_, _| {}).unwrap();
    let mut c = behind_cfg(dir.path(), 1000);
    c.pending_records_max = 3;
    let w = WalWriter::open(c, rec.next_lsn, rec.tail_segment).unwrap();
    let mut last = 0;
    for _ in 0..3 {
        last = w.append(b"x").unwrap();
        assert!(w.wait_written(last, Duration::from_secs(2)));
    }
    // Written, so no longer queued for the flusher, but not fsynced: the bound still holds.
    assert!(w.committed_lsn() < last);
    assert!(matches!(w.append(b"x"), Err(AppendError::Full)));
    assert!(w.wait_committed(last, Duration::from_secs(5)));
    assert!(w.append(b"x").is_ok());
    w.close();
    assert_eq!(read_all(dir.path()).len(), 4);
}
