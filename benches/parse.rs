//! Parse + validate per order, for the sample-sized order:
//!   cargo bench --bench parse
//! Prints orders/s on one core next to the ceiling of merely reading the same
//! bytes as untyped JSON.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use order_service::domain::{parse_order, Limits, SAMPLE_ORDER};

fn parse(c: &mut Criterion) {
    let bytes =
        serde_json::to_vec(&serde_json::from_str::<serde_json::Value>(SAMPLE_ORDER).unwrap())
            .unwrap();
    let limits = Limits::default();
    let mut group = c.benchmark_group("sample order");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse_order (parse + validate)", |b| {
        b.iter(|| parse_order(std::hint::black_box(&bytes), &limits).unwrap())
    });
    group.bench_function("serde_json::Value only (ceiling)", |b| {
        b.iter(|| {
            serde_json::from_slice::<serde_json::Value>(std::hint::black_box(&bytes)).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
