//! Engine micro-benchmarks: one `Node::update` (serf and tomo profiles) and
//! `Coordinate::distance_to`, ranking 10 000 instances by distance (what
//! `?near=` does per query), and one sample into a node's tomography. Run with `cargo bench --bench vivaldi`;
//! `tomo sim` reports the same update rate measured the serf harness's way.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tomo::tomography::{RttSketch, Tomography, TomographyConfig};
use tomo::vivaldi::{Config, Coordinate, Node};

/// Peers with settled-looking coordinates and the RTTs to them.
fn peers(cfg: &Config, n: usize) -> Vec<(Coordinate, f64)> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    (0..n)
        .map(|_| {
            let mut c = Coordinate::origin(cfg);
            for v in c.vec.iter_mut() {
                *v = rng.random::<f64>() * 0.1;
            }
            c.error = 0.2;
            c.height = 0.001;
            let rtt = 0.005 + rng.random::<f64>() * 0.2;
            (c, rtt)
        })
        .collect()
}

fn update(c: &mut Criterion) {
    for cfg in [Config::serf(), Config::tomo()] {
        let ps = peers(&cfg, 64);
        let mut node: Node<u32> = Node::new(cfg.clone()).expect("valid config");
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut k = 0usize;
        c.bench_function(&format!("update/{}", cfg.profile), |b| {
            b.iter(|| {
                k = (k + 1) % ps.len();
                let (coord, rtt) = &ps[k];
                node.update(&(k as u32), coord, *rtt, &mut rng)
                    .expect("valid sample");
            })
        });
    }
}

fn distance(c: &mut Criterion) {
    let cfg = Config::tomo();
    let ps = peers(&cfg, 2);
    c.bench_function("distance_to", |b| {
        b.iter(|| black_box(&ps[0].0).distance_to(black_box(&ps[1].0)))
    });
    let many = peers(&cfg, 10_000);
    let me = ps[0].0.clone();
    c.bench_function("rank_10k_by_distance", |b| {
        b.iter(|| {
            let mut d: Vec<(f64, usize)> = many
                .iter()
                .enumerate()
                .map(|(i, (p, _))| (me.distance_to(p), i))
                .collect();
            d.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
            black_box(d[0])
        })
    });
}

/// One RTT sample into a node's tomography (per-peer sketch, tail excess,
/// coordinate calibration), over 64 peers with spread-out RTTs.
fn tomography(c: &mut Criterion) {
    let mut t: Tomography<u32> = Tomography::new(TomographyConfig::default());
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let samples: Vec<(u32, f64)> = (0..4096)
        .map(|_| {
            let peer = rng.random_range(0..64u32);
            let base = 0.01 + peer as f64 * 0.004;
            (peer, base * (1.0 + 0.3 * rng.random::<f64>()))
        })
        .collect();
    let mut k = 0usize;
    c.bench_function("tomography_record", |b| {
        b.iter(|| {
            k = (k + 1) % samples.len();
            let (peer, rtt) = samples[k];
            let now = Duration::from_millis(k as u64 * 10);
            t.record(&peer, rtt, Some(rtt * 0.9), now)
                .expect("valid sample");
        })
    });
    eprintln!("bytes per peer sketch: {}", RttSketch::bytes());
}

criterion_group!(benches, update, distance, tomography);
criterion_main!(benches);
