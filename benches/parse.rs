//! Parse + validate per order, for the sample-sized order:
//!   cargo bench --bench parse
//! Prints orders/s on one core next to two ceilings of merely reading the same
//! bytes: into the typed model with nothing checked, and into untyped JSON.
//! A rejected order takes the slower explaining path; its cost is shown too.
//! Ends with the ratios to the ceilings, read from criterion's estimates.

use criterion::{Criterion, Throughput};
use order_service::domain::{parse_order, Limits, OrderDocument, SAMPLE_ORDER};

const GROUP: &str = "parse";
const PARSE: &str = "parse_order";
const TYPED: &str = "typed_serde_only";
const TREE: &str = "json_tree_only";
const REJECTED: &str = "parse_order_rejected";

fn parse(c: &mut Criterion) {
    let sample: serde_json::Value = serde_json::from_str(SAMPLE_ORDER).unwrap();
    let bytes = serde_json::to_vec(&sample).unwrap();
    let mut broken = sample.clone();
    broken["delivery"]["email"] = "not-an-address".into();
    let broken = serde_json::to_vec(&broken).unwrap();
    let limits = Limits::default();

    let mut group = c.benchmark_group(GROUP);
    group.throughput(Throughput::Elements(1));
    group.bench_function(PARSE, |b| {
        b.iter(|| parse_order(std::hint::black_box(&bytes), &limits).unwrap())
    });
    group.bench_function(TYPED, |b| {
        b.iter(|| {
            let text = std::str::from_utf8(std::hint::black_box(&bytes)).unwrap();
            serde_json::from_str::<OrderDocument>(text).unwrap()
        })
    });
    group.bench_function(TREE, |b| {
        b.iter(|| {
            serde_json::from_slice::<serde_json::Value>(std::hint::black_box(&bytes)).unwrap()
        })
    });
    group.bench_function(REJECTED, |b| {
        b.iter(|| parse_order(std::hint::black_box(&broken), &limits).unwrap_err())
    });
    group.finish();
}

/// Mean time per order of one benchmark of this run, in nanoseconds.
fn mean_ns(name: &str) -> Option<f64> {
    let home = std::env::var("CRITERION_HOME").unwrap_or_else(|_| {
        let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
        format!("{target}/criterion")
    });
    let path = format!("{home}/{GROUP}/{name}/new/estimates.json");
    let estimates: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    estimates["mean"]["point_estimate"].as_f64()
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    parse(&mut criterion);
    criterion.final_summary();
    // Only a real run (`cargo bench` passes --bench); not --list or test mode.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let Some(parse) = mean_ns(PARSE) else {
        return;
    };
    println!(
        "\nparse + validate: {:.0} orders/s on one core",
        1e9 / parse
    );
    for (ceiling, what) in [
        (TYPED, "ceiling: read into the typed model, nothing checked"),
        (TREE, "read into an untyped JSON tree, nothing checked"),
    ] {
        if let Some(ns) = mean_ns(ceiling) {
            println!(
                "  {what}: {:.0} orders/s; ratio {:.2}",
                1e9 / ns,
                ns / parse
            );
        }
    }
    if let Some(ns) = mean_ns(REJECTED) {
        println!(
            "  a rejected order, every problem explained: {:.0} orders/s",
            1e9 / ns
        );
    }
}
