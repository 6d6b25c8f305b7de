// An integer hash (lowbias32) for the random numbers of sampling and synthetic weights.

fn hash(a: u32) -> u32 {
    var x = a;
    x = x ^ (x >> 16u);
    x = x * 0x7feb352du;
    x = x ^ (x >> 15u);
    x = x * 0x846ca68bu;
    x = x ^ (x >> 16u);
    return x;
}
