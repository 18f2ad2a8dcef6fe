//! The on-disk activemap format: one bit per extent (bit n in byte n / 8,
//! mask 1 << (n % 8)), the bitmap sized in whole 64-bit words and the area
//! on disk rounded up to the sector size. The in-memory activemap (pending
//! write counts, keepdirty list, sync map) belongs to the C core.

/// Number of extents covering `datasize` bytes (the last one may be partial).
/// Zero when either argument is zero.
pub fn nextents(datasize: u64, extentsize: u32) -> u64 {
    if datasize == 0 || extentsize == 0 {
        return 0;
    }
    (datasize - 1) / u64::from(extentsize) + 1
}

/// Bytes of bitmap for `nextents` extents: whole 64-bit words, as the
/// reference's bitstring of unsigned longs.
pub fn bitmap_size(nextents: u64) -> u64 {
    nextents.div_ceil(64).saturating_mul(8)
}

/// Size of the activemap on disk for `size` bytes of data, as the
/// reference's activemap_calc_ondisk_size: the bitmap rounded up to a
/// multiple of the sector size (a zero sector size means no rounding).
pub fn ondisk_size(size: u64, extentsize: u32, sectorsize: u32) -> u64 {
    let bytes = bitmap_size(nextents(size, extentsize));
    let sector = u64::from(sectorsize);
    if sector == 0 {
        return bytes;
    }
    bytes.div_ceil(sector).saturating_mul(sector)
}

/// The dirty-extent bitmap as stored on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskMap {
    bytes: Vec<u8>,
    nextents: u64,
}

impl DiskMap {
    /// An all-clean map of `mapsize` bytes (grown if too small to hold a bit
    /// for each of `nextents` extents).
    pub fn new(nextents: u64, mapsize: u64) -> DiskMap {
        let need = nextents.div_ceil(8);
        let len = usize::try_from(mapsize.max(need)).unwrap_or(usize::MAX);
        DiskMap {
            bytes: vec![0; len],
            nextents,
        }
    }

    /// A map read from disk. Bits at or beyond `nextents` are ignored; an
    /// extent whose bit lies past the end of `b` reads as clean.
    pub fn from_bytes(b: Vec<u8>, nextents: u64) -> DiskMap {
        DiskMap { bytes: b, nextents }
    }

    /// The bytes to write to disk.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Number of extents the map covers.
    pub fn nextents(&self) -> u64 {
        self.nextents
    }

    fn locate(&self, extent: u64) -> Option<(usize, u8)> {
        if extent >= self.nextents {
            return None;
        }
        let idx = usize::try_from(extent / 8).ok()?;
        if idx >= self.bytes.len() {
            return None;
        }
        Some((idx, 1u8 << (extent % 8)))
    }

    /// Marks `extent` dirty (ignored if it is not covered by the map).
    pub fn set(&mut self, extent: u64) {
        if let Some((i, m)) = self.locate(extent) {
            if let Some(b) = self.bytes.get_mut(i) {
                *b |= m;
            }
        }
    }

    /// Marks `extent` clean.
    pub fn clear(&mut self, extent: u64) {
        if let Some((i, m)) = self.locate(extent) {
            if let Some(b) = self.bytes.get_mut(i) {
                *b &= !m;
            }
        }
    }

    /// Whether `extent` is dirty.
    pub fn is_set(&self, extent: u64) -> bool {
        self.locate(extent)
            .and_then(|(i, m)| self.bytes.get(i).map(|b| b & m != 0))
            .unwrap_or(false)
    }

    /// Number of dirty extents.
    pub fn count(&self) -> u64 {
        self.dirty_extents().count() as u64
    }

    /// The dirty extents in increasing order.
    pub fn dirty_extents(&self) -> impl Iterator<Item = u64> + '_ {
        let nextents = self.nextents;
        self.bytes
            .iter()
            .enumerate()
            .filter(|(_, b)| **b != 0)
            .flat_map(move |(i, b)| {
                (0..8u64).filter_map(move |bit| {
                    let ext = (i as u64).checked_mul(8)?.checked_add(bit)?;
                    (b & (1 << bit) != 0 && ext < nextents).then_some(ext)
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_reference_layouts() {
        // 1 GiB provider, 2 MiB extents, 512-byte sectors.
        assert_eq!(nextents((1 << 30) - 4096, 2 << 20), 512);
        assert_eq!(ondisk_size((1 << 30) - 4096, 2 << 20, 512), 512);
        // 1 TiB with 2 MiB extents: 524288 extents = 65536 bytes.
        assert_eq!(ondisk_size((1 << 40) - 4096, 2 << 20, 512), 65536);
        // 65 extents need two 64-bit words.
        assert_eq!(bitmap_size(65), 16);
        assert_eq!(ondisk_size(65 * 4096, 4096, 4096), 4096);
        assert_eq!(ondisk_size(1, 4096, 512), 512);
        assert_eq!(nextents(0, 4096), 0);
        assert_eq!(nextents(4097, 4096), 2);
    }

    #[test]
    fn bit_layout_is_byte_n_over_8_mask_n_mod_8() {
        let mut m = DiskMap::new(20, 512);
        assert_eq!(m.as_bytes().len(), 512);
        m.set(0);
        m.set(9);
        m.set(19);
        m.set(20); // past nextents: ignored
        assert_eq!(&m.as_bytes()[..3], &[0x01, 0x02, 0x08]);
        assert_eq!(m.count(), 3);
        assert_eq!(m.dirty_extents().collect::<Vec<_>>(), vec![0, 9, 19]);
        m.clear(9);
        assert!(!m.is_set(9) && m.is_set(19));
        // Garbage past nextents on disk is not a dirty extent.
        let m = DiskMap::from_bytes(vec![0xff, 0xff], 12);
        assert_eq!(m.count(), 12);
        assert!(!m.is_set(12));
    }
}
