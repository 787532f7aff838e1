//! Engine micro-benchmarks: one `Node::update` (serf and tomo profiles) and
//! `Coordinate::distance_to`, plus ranking 10 000 instances by distance (what
//! `?near=` does per query). Run with `cargo bench --bench vivaldi`;
//! `tomo sim` reports the same update rate measured the serf harness's way.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
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

criterion_group!(benches, update, distance);
criterion_main!(benches);
