//! Byte counts for people: GiB, GB and digit grouping.

/// Bytes as GiB.
pub fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Bytes as GB (10^9).
pub fn gb(bytes: usize) -> f64 {
    bytes as f64 / 1e9
}

/// 1234567 -> "1,234,567".
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes as `1,234,567 bytes (1.2 MiB)`, in GiB from 1 GiB up.
pub fn human_bytes(n: u64) -> String {
    let (v, unit) = if n >= 1 << 30 { (n as f64 / 1073741824.0, "GiB") } else { (n as f64 / 1048576.0, "MiB") };
    format!("{} bytes ({v:.1} {unit})", thousands(n as usize))
}
