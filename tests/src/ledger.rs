//! A ledger of a long stamped-block workload that goes on across faults
//! (the campaign's): every write with the moment it was issued and
//! answered on one event clock, flushes, several writes to the same block
//! in flight at once, and which writes must survive what happened since.
//! Blocks are stamped as the checker does ([`crate::checker`]), with one
//! run id for the whole ledger, so a block read back tells which write it
//! holds.
//!
//! What must survive: an acknowledged write covered by an acknowledged
//! flush (the flush was sent after the write was answered) survives
//! everything; an acknowledged write not yet flushed survives too unless
//! it was [`Ledger::excuse_unflushed`]d (its node lost power and the data
//! comes from that node) or [`Ledger::excuse_since`]d (a mode that does not
//! promise it, async after a failover). A block may hold any write that no
//! write that must survive has superseded: one issued after it was
//! answered (or, never answered, after its segment ended), since writes
//! in flight together may land in either order.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

use crate::checker::{decode_block, stamp_block, Content, NbdClient, Stamp, MIN_BLOCK};

/// What went wrong running or checking the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("{0}")]
    Check(#[from] crate::checker::CheckError),
    #[error("bad ledger options: {0}")]
    Options(String),
}

/// How one write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Acknowledged at this event.
    Acked(u64),
    /// Answered with this error at this event: the block may hold it.
    Failed(u64, u32),
    /// Never answered; its segment ended at this event.
    Unanswered(u64),
    /// Still in flight (only while a segment runs).
    Pending,
}

impl Answer {
    /// The event after which a write issued later certainly comes after it.
    fn end(&self) -> u64 {
        match *self {
            Answer::Acked(e) | Answer::Failed(e, _) | Answer::Unanswered(e) => e,
            Answer::Pending => u64::MAX,
        }
    }
}

/// One write of the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub block: u64,
    pub version: u64,
    pub issued: u64,
    pub answer: Answer,
    /// Covered by an acknowledged flush.
    pub flushed: bool,
    /// Acknowledged, not flushed, and allowed to be lost.
    pub excused: bool,
}

impl Entry {
    /// Acknowledged and not allowed to be lost.
    pub fn must_survive(&self) -> bool {
        matches!(self.answer, Answer::Acked(_)) && (self.flushed || !self.excused)
    }
}

/// How a segment of the workload runs.
#[derive(Debug, Clone)]
pub struct SegmentOptions {
    /// Requests (writes and flushes) in flight at once.
    pub queue_depth: usize,
    /// Stop issuing after this long.
    pub duration: Duration,
    /// Also stop after this many writes.
    pub max_writes: u64,
    /// A flush after every this many writes on average (0: never).
    pub flush_every: u64,
    /// Per mille of writes that go to a block already being written.
    pub overlap_permille: u64,
    /// How long any reply may take before the connection counts as lost.
    pub reply_timeout: Duration,
    /// Seed of the choices.
    pub seed: u64,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        SegmentOptions {
            queue_depth: 8,
            duration: Duration::from_secs(3),
            max_writes: u64::MAX,
            flush_every: 50,
            overlap_permille: 100,
            reply_timeout: Duration::from_secs(30),
            seed: 1,
        }
    }
}

/// What one segment did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Segment {
    pub writes: u64,
    pub acked: u64,
    pub failed: u64,
    pub unanswered: u64,
    pub flushes: u64,
    pub flushes_acked: u64,
    /// Writes issued while another write to the same block was in flight.
    pub overlapping: u64,
    /// Why it ended early (a lost connection), if it did.
    pub lost_connection: Option<String>,
}

/// The campaign's workload record; see the module documentation.
#[derive(Debug, Clone)]
pub struct Ledger {
    pub run: u64,
    pub block_size: u32,
    pub first_block: u64,
    pub blocks: u64,
    pub entries: Vec<Entry>,
    versions: HashMap<u64, u64>,
    /// Indexes of acknowledged writes no flush covers yet.
    unflushed: Vec<usize>,
    clock: u64,
    rng: u64,
}

/// What a verification found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerReport {
    pub blocks_checked: u64,
    /// Blocks missing a write that must survive.
    pub lost: Vec<String>,
    pub corrupt: Vec<String>,
    /// Blocks holding a write newer than what must survive (fine).
    pub newer: u64,
    /// Acknowledged writes that were allowed to be lost and are missing.
    pub excused_missing: u64,
    /// Blocks whose sectors come from different writes, each of which the
    /// block may hold (a power cut tore an unflushed write: a disk writes
    /// sectors, not blocks).
    pub torn: u64,
}

impl LedgerReport {
    pub fn passed(&self) -> bool {
        self.lost.is_empty() && self.corrupt.is_empty()
    }
}

impl fmt::Display for LedgerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} blocks checked: {} lost, {} corrupt, {} newer than required, {} excused writes missing, {} torn between allowed writes",
            self.blocks_checked,
            self.lost.len(),
            self.corrupt.len(),
            self.newer,
            self.excused_missing,
            self.torn
        )?;
        for l in self.lost.iter().take(5) {
            write!(f, "\n  LOST {l}")?;
        }
        for c in self.corrupt.iter().take(5) {
            write!(f, "\n  CORRUPT {c}")?;
        }
        Ok(())
    }
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What a handle in flight stands for.
enum InFlight {
    Write(usize),
    Flush { issued: u64 },
}

impl Ledger {
    /// An empty ledger over `blocks` blocks of `block_size` bytes from
    /// `first_block`, stamping run id `run`.
    pub fn new(
        run: u64,
        block_size: u32,
        first_block: u64,
        blocks: u64,
    ) -> Result<Ledger, LedgerError> {
        if block_size < MIN_BLOCK as u32 || !block_size.is_multiple_of(8) || blocks == 0 {
            return Err(LedgerError::Options(format!(
                "block size {block_size} (a multiple of 8, at least {MIN_BLOCK}) and {blocks} blocks"
            )));
        }
        Ok(Ledger {
            run,
            block_size,
            first_block,
            blocks,
            entries: Vec::new(),
            versions: HashMap::new(),
            unflushed: Vec::new(),
            clock: 0,
            rng: run ^ 0x1ed9e7,
        })
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The event clock now.
    pub fn now(&self) -> u64 {
        self.clock
    }

    /// Acknowledged writes so far.
    pub fn acked(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| matches!(e.answer, Answer::Acked(_)))
            .count() as u64
    }

    /// Run a segment on a connected client until its limits, or until the
    /// connection fails (writes without an answer are then
    /// [`Answer::Unanswered`]).
    pub fn run(
        &mut self,
        client: &mut NbdClient,
        o: &SegmentOptions,
    ) -> Result<Segment, LedgerError> {
        let bs = u64::from(self.block_size);
        if client.size() < (self.first_block + self.blocks) * bs {
            return Err(LedgerError::Options(format!(
                "the export has {} bytes, the ledger needs {}",
                client.size(),
                (self.first_block + self.blocks) * bs
            )));
        }
        client
            .set_timeout(o.reply_timeout)
            .map_err(LedgerError::Check)?;
        let mut rng = o.seed ^ splitmix(&mut self.rng);
        let qd = o.queue_depth.max(1);
        let mut inflight: HashMap<u64, InFlight> = HashMap::new();
        let mut busy: BTreeMap<u64, usize> = BTreeMap::new();
        let mut seg = Segment::default();
        let mut buf = vec![0u8; self.block_size as usize];
        let start = Instant::now();
        let mut handle: u64 = 0;
        let mut lost = None;
        loop {
            let may_issue = start.elapsed() < o.duration && seg.writes < o.max_writes;
            if may_issue && inflight.len() < qd {
                handle += 1;
                let flush = o.flush_every > 0 && splitmix(&mut rng).is_multiple_of(o.flush_every);
                if flush {
                    let issued = self.tick();
                    inflight.insert(handle, InFlight::Flush { issued });
                    seg.flushes += 1;
                    if let Err(e) = client.send_flush(handle) {
                        lost = Some(format!("sending a flush: {e}"));
                        break;
                    }
                    continue;
                }
                let overlap = !busy.is_empty() && splitmix(&mut rng) % 1000 < o.overlap_permille;
                let block = if overlap {
                    let k = (splitmix(&mut rng) % busy.len() as u64) as usize;
                    *busy.keys().nth(k).unwrap_or(&self.first_block)
                } else {
                    self.first_block + splitmix(&mut rng) % self.blocks
                };
                if busy.contains_key(&block) {
                    seg.overlapping += 1;
                }
                let v = self.versions.entry(block).or_insert(0);
                *v += 1;
                let version = *v;
                let seq = self.entries.len() as u64 + 1;
                stamp_block(
                    &mut buf,
                    &Stamp {
                        run: self.run,
                        block,
                        version,
                        seq,
                    },
                );
                let issued = self.tick();
                self.entries.push(Entry {
                    seq,
                    block,
                    version,
                    issued,
                    answer: Answer::Pending,
                    flushed: false,
                    excused: false,
                });
                let idx = self.entries.len() - 1;
                *busy.entry(block).or_insert(0) += 1;
                inflight.insert(handle, InFlight::Write(idx));
                seg.writes += 1;
                if let Err(e) = client.send_write(handle, block * bs, &buf, false) {
                    lost = Some(format!("sending write {seq}: {e}"));
                    break;
                }
                continue;
            }
            if inflight.is_empty() {
                break;
            }
            let (h, err) = match client.recv_reply() {
                Ok(r) => r,
                Err(e) => {
                    lost = Some(format!("waiting for a reply: {e}"));
                    break;
                }
            };
            let at = self.tick();
            match inflight.remove(&h) {
                None => {
                    lost = Some(format!("reply for unknown handle {h}"));
                    break;
                }
                Some(InFlight::Write(idx)) => {
                    let e = &mut self.entries[idx];
                    e.answer = if err == 0 {
                        seg.acked += 1;
                        self.unflushed.push(idx);
                        Answer::Acked(at)
                    } else {
                        seg.failed += 1;
                        Answer::Failed(at, err)
                    };
                    if let Some(n) = busy.get_mut(&e.block) {
                        *n -= 1;
                        if *n == 0 {
                            busy.remove(&e.block);
                        }
                    }
                }
                Some(InFlight::Flush { issued }) => {
                    if err == 0 {
                        seg.flushes_acked += 1;
                        // Covers every write answered before it was sent.
                        let entries = &mut self.entries;
                        self.unflushed.retain(|&i| {
                            let covered =
                                matches!(entries[i].answer, Answer::Acked(a) if a < issued);
                            if covered {
                                entries[i].flushed = true;
                            }
                            !covered
                        });
                    }
                }
            }
        }
        let end = self.tick();
        for (_, f) in inflight {
            if let InFlight::Write(idx) = f {
                self.entries[idx].answer = Answer::Unanswered(end);
                seg.unanswered += 1;
            }
        }
        seg.lost_connection = lost;
        Ok(seg)
    }

    /// A node that the data now comes from lost power: what it had
    /// acknowledged and not flushed may be lost. Returns how many writes.
    pub fn excuse_unflushed(&mut self) -> u64 {
        let mut n = 0;
        for &i in &self.unflushed {
            let e = &mut self.entries[i];
            if !e.excused {
                e.excused = true;
                n += 1;
            }
        }
        n
    }

    /// Writes issued after event `since` may be lost, flushed or not (async
    /// after a failover: the secondary may not have received them).
    pub fn excuse_since(&mut self, since: u64) -> u64 {
        let mut n = 0;
        for (i, e) in self.entries.iter_mut().enumerate().rev() {
            if e.issued <= since {
                break;
            }
            if matches!(e.answer, Answer::Acked(_)) {
                if e.flushed {
                    self.unflushed.push(i);
                }
                e.excused = true;
                e.flushed = false;
                n += 1;
            }
        }
        n
    }

    /// The pair was in sync again, which needs a flush of both: every
    /// acknowledged write so far that had to survive is durable on both
    /// nodes now. Writes that were excused stay so: the check may have
    /// found them missing, and then they are gone for good.
    pub fn settle(&mut self) {
        for i in std::mem::take(&mut self.unflushed) {
            if !self.entries[i].excused {
                self.entries[i].flushed = true;
            }
        }
    }

    /// Verify with `read(byte offset, length)` of the device.
    pub fn verify_with(
        &self,
        mut read: impl FnMut(u64, usize) -> Result<Vec<u8>, LedgerError>,
    ) -> Result<LedgerReport, LedgerError> {
        let bs = u64::from(self.block_size);
        let mut per_block: HashMap<u64, Vec<&Entry>> = HashMap::new();
        for e in &self.entries {
            per_block.entry(e.block).or_default().push(e);
        }
        let mut r = LedgerReport::default();
        let per_chunk = ((256u64 << 10) / bs).max(1);
        let mut b = self.first_block;
        let end = self.first_block + self.blocks;
        while b < end {
            let n = per_chunk.min(end - b);
            let data = read(b * bs, (n * bs) as usize)?;
            if (data.len() as u64) < n * bs {
                return Err(LedgerError::Options(format!(
                    "short read at block {b}: {} bytes",
                    data.len()
                )));
            }
            for (k, blk) in data.chunks(bs as usize).enumerate() {
                let block = b + k as u64;
                r.blocks_checked += 1;
                let writes = per_block.get(&block).map(Vec::as_slice).unwrap_or(&[]);
                self.check_block(block, blk, writes, &mut r);
            }
            b += n;
        }
        Ok(r)
    }

    fn check_block(&self, block: u64, blk: &[u8], writes: &[&Entry], r: &mut LedgerReport) {
        // The found write's end: what must survive may not come after it.
        let found: Option<&Entry> = match decode_block(blk) {
            Content::Corrupt => {
                if self.torn_between_allowed(block, blk, writes) {
                    r.torn += 1;
                } else {
                    r.corrupt.push(format!(
                        "block {block}: a stamp with a bad checksum, not made of writes it may hold; its sectors: {}",
                        self.sector_origins(block, blk, writes)
                    ));
                }
                return;
            }
            Content::Stamped(s) if s.run == self.run => {
                if s.block != block {
                    r.corrupt.push(format!(
                        "block {block}: holds block {}'s version {}",
                        s.block, s.version
                    ));
                    return;
                }
                match writes.iter().find(|e| e.version == s.version) {
                    Some(e) if e.seq == s.seq => Some(*e),
                    _ => {
                        r.corrupt.push(format!(
                            "block {block}: version {} seq {} was never written",
                            s.version, s.seq
                        ));
                        return;
                    }
                }
            }
            _ => None,
        };
        let found_end = found.map_or(0, |e| e.answer.end());
        let found_issued = found.map_or(0, |e| e.issued);
        let superseding = writes
            .iter()
            .filter(|m| m.must_survive() && m.issued > found_end)
            .max_by_key(|m| m.issued);
        if let Some(m) = superseding {
            r.lost.push(format!(
                "block {block}: write seq {} (version {}, {}) must survive, found {}",
                m.seq,
                m.version,
                if m.flushed { "flushed" } else { "acknowledged" },
                found.map_or("no write of this run".to_string(), |f| format!(
                    "version {} (seq {})",
                    f.version, f.seq
                ))
            ));
            return;
        }
        let newest_required = writes
            .iter()
            .filter(|m| m.must_survive())
            .map(|m| m.issued)
            .max();
        if newest_required.is_some_and(|n| found_issued > n) {
            r.newer += 1;
        }
        r.excused_missing += writes
            .iter()
            .filter(|m| m.excused && !m.flushed && m.issued > found_end)
            .count() as u64;
    }

    /// Whether every 512-byte sector of `blk` is that sector of a write
    /// the block may hold (one no write that must survive supersedes), or
    /// zeros while nothing must survive there.
    fn torn_between_allowed(&self, block: u64, blk: &[u8], writes: &[&Entry]) -> bool {
        const SECTOR: usize = 512;
        let allowed: Vec<Vec<u8>> = writes
            .iter()
            .filter(|w| {
                !writes
                    .iter()
                    .any(|m| m.must_survive() && m.issued > w.answer.end())
            })
            .map(|w| {
                let mut b = vec![0u8; blk.len()];
                stamp_block(
                    &mut b,
                    &Stamp {
                        run: self.run,
                        block,
                        version: w.version,
                        seq: w.seq,
                    },
                );
                b
            })
            .collect();
        let zeros_allowed = !writes.iter().any(|m| m.must_survive());
        blk.chunks(SECTOR).enumerate().all(|(i, sec)| {
            let at = i * SECTOR;
            (zeros_allowed && sec.iter().all(|&b| b == 0))
                || allowed
                    .iter()
                    .any(|a| a.get(at..at + sec.len()) == Some(sec))
        })
    }

    /// Which write each 512-byte sector of `blk` holds (by seq; `0` for
    /// zeros, `?` for none), for messages.
    fn sector_origins(&self, block: u64, blk: &[u8], writes: &[&Entry]) -> String {
        let images: Vec<(u64, Vec<u8>)> = writes
            .iter()
            .map(|w| {
                let mut b = vec![0u8; blk.len()];
                stamp_block(
                    &mut b,
                    &Stamp {
                        run: self.run,
                        block,
                        version: w.version,
                        seq: w.seq,
                    },
                );
                (w.seq, b)
            })
            .collect();
        let sectors: Vec<String> = blk
            .chunks(512)
            .enumerate()
            .map(|(i, sec)| {
                let at = i * 512;
                let mut m: Vec<String> = images
                    .iter()
                    .filter(|(_, b)| b.get(at..at + sec.len()) == Some(sec))
                    .map(|(seq, _)| seq.to_string())
                    .collect();
                if sec.iter().all(|&b| b == 0) {
                    m.push("0".into());
                }
                if m.is_empty() {
                    "?".into()
                } else {
                    m.join("|")
                }
            })
            .collect();
        let hist: Vec<String> = writes
            .iter()
            .map(|w| {
                format!(
                    "seq {} v{} issued {} {:?}{}",
                    w.seq,
                    w.version,
                    w.issued,
                    w.answer,
                    if w.flushed { " flushed" } else { "" }
                )
            })
            .collect();
        format!("[{}]; writes: {}", sectors.join(" "), hist.join("; "))
    }

    /// Verify through an NBD export.
    pub fn verify_export(&self, client: &mut NbdClient) -> Result<LedgerReport, LedgerError> {
        self.verify_with(|off, len| client.read_at(off, len).map_err(LedgerError::Check))
    }

    /// Verify a file whose byte `offset` is the device's byte 0.
    pub fn verify_file(
        &self,
        path: &std::path::Path,
        offset: u64,
    ) -> Result<LedgerReport, LedgerError> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(path)
            .map_err(|e| LedgerError::Options(format!("open {}: {e}", path.display())))?;
        self.verify_with(|off, len| {
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, offset + off)
                .map_err(|e| LedgerError::Options(format!("read {}: {e}", path.display())))?;
            Ok(buf)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger_with(entries: &[(u64, u64, Answer, bool, bool)]) -> Ledger {
        let mut l = Ledger::new(5, 64, 0, 2).unwrap();
        for (i, &(block, issued, answer, flushed, excused)) in entries.iter().enumerate() {
            let v = l.versions.entry(block).or_insert(0);
            *v += 1;
            if matches!(answer, Answer::Acked(_)) && !flushed {
                l.unflushed.push(i);
            }
            l.entries.push(Entry {
                seq: i as u64 + 1,
                block,
                version: *v,
                issued,
                answer,
                flushed,
                excused,
            });
        }
        l
    }

    fn image(l: &Ledger, present: &[usize]) -> Vec<u8> {
        let mut img = vec![0u8; 128];
        for &i in present {
            let e = l.entries[i];
            stamp_block(
                &mut img[(e.block * 64) as usize..(e.block * 64 + 64) as usize],
                &Stamp {
                    run: l.run,
                    block: e.block,
                    version: e.version,
                    seq: e.seq,
                },
            );
        }
        img
    }

    fn check(l: &Ledger, img: &[u8]) -> LedgerReport {
        l.verify_with(|o, n| Ok(img[o as usize..o as usize + n].to_vec()))
            .unwrap()
    }

    #[test]
    fn overlapping_writes_may_land_in_either_order() {
        // Writes 1 and 2 to block 0 in flight together, both acknowledged.
        let l = ledger_with(&[
            (0, 1, Answer::Acked(4), false, false),
            (0, 2, Answer::Acked(3), false, false),
        ]);
        assert!(check(&l, &image(&l, &[0])).passed());
        assert!(check(&l, &image(&l, &[1])).passed());
        assert!(!check(&l, &image(&l, &[])).passed(), "nothing there");
    }

    #[test]
    fn what_must_survive_and_what_may_go() {
        // Block 0: v1 flushed, v2 acknowledged after, not flushed.
        let mut l = ledger_with(&[
            (0, 1, Answer::Acked(2), true, false),
            (0, 3, Answer::Acked(4), false, false),
            (1, 5, Answer::Unanswered(9), false, false),
        ]);
        let r = check(&l, &image(&l, &[0]));
        assert_eq!(r.lost.len(), 1, "v2 was acknowledged: {r}");
        l.excuse_unflushed();
        let r = check(&l, &image(&l, &[0]));
        assert!(r.passed(), "{r}");
        assert_eq!(r.excused_missing, 1);
        // The flushed v1 may never go.
        let r = check(&l, &image(&l, &[]));
        assert_eq!(r.lost.len(), 1, "{r}");
        // An unanswered write may or may not be there.
        assert!(check(&l, &image(&l, &[0, 2])).passed());
        // Once the pair is in sync again, what was excused stays so.
        l.settle();
        assert!(check(&l, &image(&l, &[0])).passed());
        // A torn block is corrupt.
        let mut img = image(&l, &[0]);
        img[20] ^= 1;
        assert_eq!(check(&l, &img).corrupt.len(), 1);
    }
}
