//! Sliding-window evaluation: which tokens each window feeds and which targets it scores.

/// One evaluation window over the token stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// First input token.
    pub begin: usize,
    /// One past the last input token.
    pub end: usize,
    /// First target position scored by this window (targets `score_from..end`).
    pub score_from: usize,
}

/// Windows of `ctx` tokens advancing by `stride` over `n` tokens. Each target position is scored
/// exactly once, by the first window that contains it with at least one token of context before
/// it (the usual sliding-window definition; with `stride == ctx` the first token of every window
/// is unscored).
pub fn windows(n: usize, ctx: usize, stride: usize) -> Vec<Window> {
    let mut out = Vec::new();
    let mut prev_end = 0;
    let mut begin = 0;
    while begin < n {
        let end = (begin + ctx).min(n);
        let score_from = prev_end.max(begin + 1);
        if score_from < end {
            out.push(Window { begin, end, score_from });
        }
        prev_end = end;
        if end == n {
            break;
        }
        begin += stride;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_overlapping_windows_skip_each_first_token() {
        let w = windows(10, 4, 4);
        assert_eq!(w, vec![
            Window { begin: 0, end: 4, score_from: 1 },
            Window { begin: 4, end: 8, score_from: 5 },
            Window { begin: 8, end: 10, score_from: 9 },
        ]);
    }

    #[test]
    fn overlapping_windows_score_each_target_once() {
        let w = windows(10, 4, 2);
        let mut scored = vec![0; 10];
        for x in &w {
            for count in &mut scored[x.score_from..x.end] {
                *count += 1;
            }
        }
        assert_eq!(scored, vec![0, 1, 1, 1, 1, 1, 1, 1, 1, 1]);
        assert!(w.iter().all(|x| x.end - x.begin <= 4));
    }
}
