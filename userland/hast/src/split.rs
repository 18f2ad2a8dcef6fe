//! Cutting a byte range into pieces no larger than what the other side
//! accepts: client requests split for the core or the peer, resync chunks.

/// The pieces `(offset, length)` of `[offset, offset + length)`, each at
/// most `max` bytes (`max` 0 counts as 1), in order.
pub fn pieces(offset: u64, length: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
    let max = max.max(1);
    let end = offset.saturating_add(length);
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let n = max.min(end - at);
        let piece = (at, n);
        at += n;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_range_in_order() {
        assert_eq!(
            pieces(100, 250, 100).collect::<Vec<_>>(),
            vec![(100, 100), (200, 100), (300, 50)]
        );
        assert_eq!(pieces(0, 0, 10).count(), 0);
        assert_eq!(
            pieces(5, 3, 0).collect::<Vec<_>>(),
            vec![(5, 1), (6, 1), (7, 1)]
        );
        assert_eq!(
            pieces(u64::MAX - 2, 10, 2).collect::<Vec<_>>(),
            vec![(u64::MAX - 2, 2)]
        );
    }
}
