//! The federated format and aggregation against an independent Python implementation
//! (tools/reference/fed_aggregate.py, written from docs/protocol.md): its encoded sessions
//! and uploads decode here, and every round's coefficients and FedKSeed-Pro weights equal
//! the ones it computed, in FedKSeed and shared-seed modes, with trimming, a median, sign
//! votes and a Byzantine client.

use edgetune::fed::aggregate::{Policy, ProStats, SharedRule, updates};
use edgetune::fed::{Session, Upload};
use edgetune::train::SeedWeights;
use serde_json::Value;
use std::path::Path;

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn aggregation_matches_the_python_reference() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/fed/cases.json");
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = golden["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let s = Session::decode(&unhex(case["session"].as_str().unwrap())).unwrap();
        let p = &case["policy"];
        let policy = Policy {
            trim: p["trim"].as_f64().unwrap(),
            shared: if p["rule"] == "mean" {
                SharedRule::Mean
            } else {
                SharedRule::Median
            },
            temperature: p["temperature"].as_f64(),
            max_samples: p["max_samples"].as_u64().unwrap() as u32,
        };
        let mut stats = ProStats::new(s.k);
        let mut weights: Option<SeedWeights> = None;
        for (i, r) in case["rounds"].as_array().unwrap().iter().enumerate() {
            let round = i as u32 + 1;
            let ups: Vec<Upload> = r["uploads"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| Upload::decode(&unhex(h.as_str().unwrap()), &s).unwrap())
                .collect();
            let got = updates(&s, round, &ups, weights.as_ref(), &policy);
            let want: Vec<(u32, i32)> = r["updates"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| (u[0].as_u64().unwrap() as u32, u[1].as_i64().unwrap() as i32))
                .collect();
            assert!(!want.is_empty(), "{name} round {round}: an empty golden");
            assert_eq!(got, want, "{name} round {round}");
            stats.record(&s, round, &ups, weights.as_ref());
            let next = policy.temperature.map(|t| stats.weights(t));
            let want_w: Option<Vec<u8>> = r["weights"]
                .as_array()
                .map(|a| a.iter().map(|w| w.as_u64().unwrap() as u8).collect());
            assert_eq!(next, want_w, "{name} round {round}: Pro weights");
            weights = next.map(|w| {
                SeedWeights::new(&w.iter().map(|&x| u32::from(x)).collect::<Vec<_>>()).unwrap()
            });
        }
    }
}
