fn main() {
    let path = std::env::args().nth(1).unwrap_or_default();
    let (events, _) =
        vigil::replay::read_file(std::path::Path::new(&path)).unwrap_or_else(|e| panic!("{e}"));
    let rss_before = resident_bytes();
    let cfg = vigil::config::FeatureConfig::default();
    let mut p = vigil::state::PartitionState::default();
    for e in &events {
        if let Ok(t) = vigil::decode::Decoder::Json.decode(&e.payload) {
            let a = p.account_mut(&t.account_id, t.time, &cfg);
            vigil::features::observe(a, &t, &cfg);
            a.record_score(vigil::state::RecentScore {
                time: t.time,
                forest: 0.0,
                lof: 0.0,
                alert: false,
            });
        }
    }
    let started = std::time::Instant::now();
    let total = std::hint::black_box(p.bytes());
    let exact_took = started.elapsed();
    let mut b: Vec<usize> = p.accounts.values().map(|a| a.bytes()).collect();
    b.sort();
    let n: Vec<u64> = p.accounts.values().map(|a| a.transactions).collect();
    println!(
        "accounts {} mean {} median {} p99 {} max {} events/account mean {:.1} total {}",
        b.len(),
        b.iter().sum::<usize>() / b.len(),
        b[b.len() / 2],
        b[b.len() * 99 / 100],
        b[b.len() - 1],
        n.iter().sum::<u64>() as f64 / n.len() as f64,
        total
    );
    let started = std::time::Instant::now();
    let estimate = std::hint::black_box(p.bytes_estimate());
    println!(
        "over {} accounts, PartitionState::bytes(): {} in {:.2} ms; bytes_estimate(): {} in {:.2} ms",
        p.accounts.len(),
        total,
        exact_took.as_secs_f64() * 1e3,
        estimate,
        started.elapsed().as_secs_f64() * 1e3
    );
    println!(
        "of which inline (the struct itself): {} bytes",
        std::mem::size_of::<vigil::state::AccountState>()
    );
    // What the allocator really holds for the states: every allocation's header and rounding
    // included (the events, read before, are not).
    println!(
        "resident memory grew by {} bytes per account while folding",
        resident_bytes().saturating_sub(rss_before) / b.len().max(1)
    );
    // The changelog's cost per record: every state written as the stream writes it, then read
    // back as a restore does.
    let started = std::time::Instant::now();
    let records: Vec<Vec<u8>> = p.accounts.values().map(|a| a.to_bytes()).collect();
    let written = started.elapsed();
    let started = std::time::Instant::now();
    let restored = records
        .iter()
        .filter(|r| vigil::state::AccountState::from_bytes(r).is_ok())
        .count();
    println!(
        "changelog records: {} bytes mean, written in {:.0} ns each, {} read back in {:.0} ns each",
        records.iter().map(Vec::len).sum::<usize>() / records.len().max(1),
        written.as_nanos() as f64 / records.len().max(1) as f64,
        restored,
        started.elapsed().as_nanos() as f64 / records.len().max(1) as f64
    );
}

/// This process's resident set (Linux), 0 where it cannot be read.
fn resident_bytes() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * 4096)
}
