//! Property tests of the coordinate engine (both profiles): finite input
//! keeps every field finite and in bounds, bad input is rejected without a
//! trace, distance is a symmetric non-negative function.

use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tomo::vivaldi::{Config, Coordinate, Node, VivaldiError};

fn profile() -> impl Strategy<Value = Config> {
    prop_oneof![Just(Config::serf()), Just(Config::tomo())]
}

/// A finite coordinate of `dim` dimensions with plausible magnitudes
/// (up to ±10 s per component, error in [0, 10], adjustment ±1 s).
fn coordinate(dim: usize) -> impl Strategy<Value = Coordinate> {
    (
        proptest::collection::vec(-10.0f64..10.0, dim),
        0.0f64..10.0,
        -1.0f64..1.0,
        0.0f64..1.0,
    )
        .prop_map(|(v, error, adjustment, height)| Coordinate {
            vec: v.into_iter().collect(),
            error,
            adjustment,
            height,
        })
}

/// A valid RTT in seconds, spanning 1 µs to 10 s.
fn rtt() -> impl Strategy<Value = f64> {
    prop_oneof![1e-6f64..1e-3, 1e-3f64..1.0, 1.0f64..=10.0]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn finite_in_finite_out_and_in_bounds(
        cfg in profile(),
        steps in proptest::collection::vec((0u32..6, coordinate(8), rtt()), 1..60),
        seed in any::<u64>(),
    ) {
        let mut node: Node<u32> = Node::new(cfg.clone()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for (peer, other, rtt) in &steps {
            node.update(peer, other, *rtt, &mut rng).unwrap();
            for c in [node.coordinate(), node.published()] {
                prop_assert!(c.is_valid(), "{c:?}");
                prop_assert!(c.error >= cfg.error_min && c.error <= cfg.error_max, "error {}", c.error);
                prop_assert!(c.height >= cfg.height_min, "height {}", c.height);
                prop_assert_eq!(c.vec.len(), cfg.dimensionality);
            }
        }
        prop_assert_eq!(node.stats().updates, steps.len() as u64);
        prop_assert_eq!(node.stats().resets, 0);
    }

    #[test]
    fn bad_input_is_rejected_and_changes_nothing(
        cfg in profile(),
        warmup in proptest::collection::vec((0u32..4, coordinate(8), rtt()), 0..10),
        other in coordinate(8),
        bad_rtt in prop_oneof![
            Just(f64::NAN), Just(f64::INFINITY), Just(f64::NEG_INFINITY), Just(0.0),
            -10.0f64..-1e-9, 10.000001f64..1e6,
        ],
        field in 0usize..5,
        poison in prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(f64::NEG_INFINITY)],
    ) {
        let mut node: Node<u32> = Node::new(cfg.clone()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for (p, o, r) in &warmup {
            node.update(p, o, *r, &mut rng).unwrap();
        }
        let before = (node.coordinate().clone(), node.published().clone(), node.stats().updates);
        let e = node.update(&9, &other, bad_rtt, &mut rng);
        prop_assert!(matches!(e, Err(VivaldiError::InvalidRtt(_))), "{e:?}");
        let mut poisoned = other.clone();
        match field {
            0 => poisoned.vec[3] = poison,
            1 => poisoned.error = poison,
            2 => poisoned.adjustment = poison,
            3 => poisoned.height = poison,
            _ => poisoned.vec[0] = poison,
        }
        let e = node.update(&9, &poisoned, 0.05, &mut rng);
        prop_assert_eq!(e, Err(VivaldiError::NonFiniteCoordinate));
        let mut short = other.clone();
        short.vec.pop();
        let e = node.update(&9, &short, 0.05, &mut rng);
        prop_assert!(matches!(e, Err(VivaldiError::DimensionMismatch { expected: 8, got: 7 })), "{e:?}");
        prop_assert_eq!(&before.0, node.coordinate());
        prop_assert_eq!(&before.1, node.published());
        prop_assert_eq!(before.2, node.stats().updates);
        prop_assert_eq!(node.stats().rejected, 3);
        prop_assert_eq!(node.peer_count(), warmup.iter().map(|w| w.0).collect::<std::collections::HashSet<_>>().len());
    }

    #[test]
    fn distance_is_symmetric_and_non_negative(a in coordinate(8), b in coordinate(8)) {
        let (ab, ba) = (a.distance_to(&b), b.distance_to(&a));
        prop_assert!(ab >= 0.0 && ab.is_finite());
        prop_assert_eq!(ab, ba);
        prop_assert!(a.distance_to(&a) >= 0.0);
    }

    #[test]
    fn coordinate_json_round_trips(a in coordinate(8)) {
        let s = serde_json::to_string(&a).unwrap();
        prop_assert!(s.starts_with(r#"{"Vec":["#), "{}", s);
        let back: Coordinate = serde_json::from_str(&s).unwrap();
        prop_assert_eq!(back, a);
    }
}

#[test]
fn malformed_coordinate_json_is_an_error() {
    for bad in [
        r#"{"Vec":[0.1],"Error":1.5,"Adjustment":0}"#,
        r#"{"Vec":"x","Error":1.5,"Adjustment":0,"Height":0}"#,
        r#"[1,2,3]"#,
    ] {
        assert!(serde_json::from_str::<Coordinate>(bad).is_err(), "{bad}");
    }
}
