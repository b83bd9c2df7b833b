use std::time::Duration;

use crate::helpers::{TestEnv, SAMPLE};

/// The published sample, produced to the topic, comes back over HTTP unchanged.
#[tokio::test]
async fn the_sample_order_travels_from_kafka_to_http() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;

    env.produce(&[(Some("b563feb7b2b84b6test"), SAMPLE.as_bytes())])
        .await;

    let served = service
        .wait_for_order("b563feb7b2b84b6test", Duration::from_secs(30))
        .await;
    let sample: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
    assert_eq!(served, sample);
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 1);
}
