//! The HTTP server: the order route's statuses, headers and encodings, paging,
//! the operational routes, workers, timeouts and the limits on bodies,
//! concurrency, connections and live feeds.

use std::time::Duration;

use reqwest::header;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{
    eventually, generated_orders, sample_with_uid, store_orders, Service, TestEnv,
};

/// `GET /order/{uid}` answers 200 with the order as it was produced.
pub async fn assert_serves(service: &Service, uid: &str, produced: &[u8]) {
    let response = service.get(&format!("/order/{uid}")).await;
    assert_eq!(response.status(), 200, "{uid}");
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap(),
        serde_json::from_slice::<serde_json::Value>(produced).unwrap(),
        "{uid}"
    );
}

pub async fn counter(service: &Service, tier: &str, result: &str) -> f64 {
    service
        .metric(&format!(
            "cache_requests_total{{result=\"{result}\",tier=\"{tier}\"}}"
        ))
        .await
}

#[tokio::test]
async fn order_route_statuses_headers_and_encodings() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    let order = sample_with_uid("http-route-1");
    env.produce(&[(Some("http-route-1"), order.to_string().as_bytes())])
        .await;
    let body = service
        .wait_for_order("http-route-1", Duration::from_secs(30))
        .await;
    assert_eq!(body, order);

    let ok = service.get("/order/http-route-1").await;
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()[header::CONTENT_TYPE], "application/json");
    let etag = ok.headers()[header::ETAG].to_str().unwrap().to_owned();
    assert!(
        etag.starts_with('"') && etag.ends_with('"'),
        "strong ETag: {etag}"
    );
    for (name, value) in [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
    ] {
        assert_eq!(ok.headers()[name], value);
    }
    assert!(ok.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("script-src 'self'"));

    let not_modified = service
        .client
        .get(service.url("/order/http-route-1"))
        .header(header::IF_NONE_MATCH, &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(not_modified.status(), 304);
    assert!(not_modified.bytes().await.unwrap().is_empty());

    // A trailing slash, as pasted, leads to the order; the method is kept.
    let not_following = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for (path, location) in [
        ("/order/http-route-1/", "/order/http-route-1"),
        ("/orders/http-route-1//", "/orders/http-route-1"),
        ("/api/orders/?limit=1", "/api/orders?limit=1"),
    ] {
        let moved = not_following.get(service.url(path)).send().await.unwrap();
        assert_eq!(moved.status(), 308, "{path}");
        assert_eq!(moved.headers()[header::LOCATION], location, "{path}");
    }
    let followed = service.get("/order/http-route-1/").await;
    assert_eq!(followed.status(), 200);
    assert_eq!(followed.json::<serde_json::Value>().await.unwrap(), order);
    let elsewhere = not_following
        .get(service.url("//elsewhere.example/"))
        .send()
        .await
        .unwrap();
    assert_eq!(elsewhere.status(), 404);
    assert_eq!(elsewhere.headers()["x-route"], "none");
    // A method no route takes is refused in JSON, naming the methods it takes.
    let posted = service
        .client
        .post(service.url("/order/http-route-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 405);
    assert_eq!(posted.headers()[header::ALLOW], "GET,HEAD");
    let refusal: serde_json::Value = posted.json().await.unwrap();
    assert!(refusal["error"].is_string(), "{refusal}");
    // A client may send UTF-8 raw in the request line; the Location is ASCII.
    let mut raw = tokio::net::TcpStream::connect(&service.addr).await.unwrap();
    let request = "GET /order/п/?q=é HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
    raw.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    raw.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.1 308"), "{answer}");
    assert!(
        answer.contains("\r\nlocation: /order/%d0%bf?q=%c3%a9\r\n"),
        "{answer}"
    );

    let head = service
        .client
        .head(service.url("/order/http-route-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()[header::ETAG].to_str().unwrap(), etag);

    // Compression on request, for bodies of 4 KiB and more: an order that
    // small leaves as it is; a large one is compressed.
    let mut generator = order_service::producer::Generator::new(93, 60);
    let large = std::iter::repeat_with(|| generator.valid())
        .find(|order| order.to_string().len() > 8192)
        .unwrap();
    let large_uid = large["order_uid"].as_str().unwrap();
    env.produce(&[(Some(large_uid), large.to_string().as_bytes())])
        .await;
    service
        .wait_for_order(large_uid, Duration::from_secs(30))
        .await;
    for encoding in ["gzip", "br"] {
        let get = |uid: &str| {
            service
                .client
                .get(service.url(&format!("/order/{uid}")))
                .header(header::ACCEPT_ENCODING, encoding)
                .send()
        };
        let small = get("http-route-1").await.unwrap();
        assert_eq!(small.headers().get(header::CONTENT_ENCODING), None);
        assert_eq!(small.json::<serde_json::Value>().await.unwrap(), order);
        let compressed = get(large_uid).await.unwrap();
        assert_eq!(compressed.headers()[header::CONTENT_ENCODING], encoding);
    }

    let missing = service.get("/order/no-such-order").await;
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"error": "order not found", "order_uid": "no-such-order"})
    );

    // An invalid id never reaches a store: the lookup counters do not move.
    let lookups =
        counter(&service, "memory", "miss").await + counter(&service, "memory", "hit").await;
    for bad in [
        "bad.id",
        "%3Cscript%3E",
        &"x".repeat(65),
        "..%2F..%2Fetc%2Fpasswd",
        // Found by the order_route fuzz target: escapes that are not UTF-8.
        "%%%e0'%5C",
        "%FF%FE",
    ] {
        let response = service.get(&format!("/order/{bad}")).await;
        assert_eq!(response.status(), 400, "{bad}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .starts_with("invalid order_uid: "),
            "{body}"
        );
    }
    let after =
        counter(&service, "memory", "miss").await + counter(&service, "memory", "hit").await;
    assert_eq!(lookups, after);
}

#[tokio::test]
async fn recent_orders_page_by_cursor_and_reject_bad_parameters() {
    let env = TestEnv::new().await;
    let orders = generated_orders(61, 25);
    let service = env.spawn();
    store_orders(&env, &orders).await;

    let first: serde_json::Value = service
        .get("/api/orders?limit=10")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["orders"].as_array().unwrap().len(), 10);
    let summary = &first["orders"][0];
    for field in [
        "order_uid",
        "date_created",
        "customer_id",
        "amount",
        "currency",
        "item_count",
    ] {
        assert!(!summary[field].is_null(), "{field} in {summary}");
    }
    let mut seen: Vec<String> = Vec::new();
    let mut page = first;
    loop {
        seen.extend(
            page["orders"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["order_uid"].as_str().unwrap().to_owned()),
        );
        let Some(cursor) = page["next_cursor"].as_str() else {
            break;
        };
        page = service
            .get(&format!("/api/orders?limit=10&before={cursor}"))
            .await
            .json()
            .await
            .unwrap();
    }
    assert_eq!(seen.len(), 25);
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 25, "pages do not overlap");

    // Found without their id: by exact track number, customer or transaction.
    let order: serde_json::Value = serde_json::from_slice(&orders[3].1).unwrap();
    for (name, value) in [
        ("track_number", &order["track_number"]),
        ("customer_id", &order["customer_id"]),
        ("transaction", &order["payment"]["transaction"]),
    ] {
        let value = value.as_str().unwrap();
        let found: serde_json::Value = service
            .get(&format!("/api/orders?{name}={value}"))
            .await
            .json()
            .await
            .unwrap();
        let expected: Vec<&str> = orders
            .iter()
            .map(|(uid, bytes)| {
                (
                    uid,
                    serde_json::from_slice::<serde_json::Value>(bytes).unwrap(),
                )
            })
            .filter(|(_, o)| {
                let field = if name == "transaction" {
                    &o["payment"][name]
                } else {
                    &o[name]
                };
                field == value
            })
            .map(|(uid, _)| uid.as_str())
            .collect();
        let mut got: Vec<&str> = found["orders"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["order_uid"].as_str().unwrap())
            .collect();
        got.sort_unstable();
        let mut expected = expected;
        expected.sort_unstable();
        assert!(expected.contains(&orders[3].0.as_str()));
        assert_eq!(got, expected, "{name}={value}");
    }
    let none: serde_json::Value = service
        .get("/api/orders?customer_id=nobody-at-all&track_number=x")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        none,
        serde_json::json!({ "orders": [], "next_cursor": null })
    );

    for (query, reason) in [
        ("limit=0", "limit must be a whole number from 1 to 100"),
        ("limit=101", "limit must be a whole number from 1 to 100"),
        ("limit=ten", "limit must be a whole number from 1 to 100"),
        (
            "before=abc",
            "before must be a next_cursor value from an earlier page",
        ),
        (
            "sort=asc",
            "unknown parameter \"sort\"; use track_number, customer_id, transaction, limit, before",
        ),
    ] {
        let response = service.get(&format!("/api/orders?{query}")).await;
        assert_eq!(response.status(), 400, "{query}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"], reason);
    }
}

#[tokio::test]
async fn operational_routes_and_the_openapi_document() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;

    assert_eq!(service.get("/healthz").await.status(), 200);
    let ready = service.readiness_after_warmup().await;
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["checks"]["postgres"], "up");
    assert_eq!(ready["checks"]["kafka_assignment"], "assigned");
    assert_eq!(ready["checks"]["redis"], "disabled");
    let metrics = service.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("order_service_build_info{version=\""),
        "{metrics}"
    );
    let page = service.get("/").await;
    assert_eq!(page.status(), 200);
    assert!(page
        .text()
        .await
        .unwrap()
        .contains("<script src=\"/assets/app.js\""));

    let doc: serde_json::Value = service.get("/openapi.json").await.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let text = doc.to_string();
    for reference in text.split("\"$ref\":\"#/").skip(1) {
        let pointer = format!("/{}", &reference[..reference.find('"').unwrap()]);
        assert!(doc.pointer(&pointer).is_some(), "unresolved $ref {pointer}");
    }
    // Every documented operation exists (the fallback answers anything else)...
    let paths = doc["paths"].as_object().unwrap();
    for (path, operations) in paths {
        let concrete = path.replace("{order_uid}", "no-such-order");
        for (method, operation) in operations.as_object().unwrap() {
            assert!(
                operation["responses"].is_object(),
                "{method} {path} documents its responses"
            );
            if path.ends_with("/stream") {
                continue;
            }
            let request = service.client.request(
                method.to_uppercase().parse().unwrap(),
                service.url(&concrete),
            );
            let response = request.send().await.unwrap();
            assert_ne!(
                response
                    .headers()
                    .get("x-route")
                    .map(|v| v.to_str().unwrap()),
                Some("none"),
                "{method} {path}"
            );
            let status = response.status().as_str().to_owned();
            assert!(
                operation["responses"].get(&status).is_some(),
                "{method} {path} answered undocumented {status}"
            );
        }
    }
    // ...and nothing else does.
    let fallback = service.get("/orders").await;
    assert_eq!(fallback.status(), 404);
    assert_eq!(fallback.headers()["x-route"], "none");
    let routes = [
        "/order/{order_uid}",
        "/api/orders",
        "/api/dead-letters",
        "/api/dead-letters/{topic}/{partition}/{offset}",
        "/api/orders/stream",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/",
        "/orders/{order_uid}",
        "/rejected",
        "/assets/app.js",
        "/assets/app.css",
    ];
    let mut documented: Vec<&str> = paths.keys().map(String::as_str).collect();
    let mut expected = routes.to_vec();
    documented.sort_unstable();
    expected.sort_unstable();
    assert_eq!(documented, expected);
}

/// One serving thread or several: every route answers, those that read
/// PostgreSQL too (their work runs on the runtime that owns the pool), under
/// many requests at once; and a second instance cannot take the address.
#[tokio::test]
async fn any_number_of_workers_serves_every_route() {
    let env = TestEnv::new().await;
    let orders = generated_orders(91, 4);
    for workers in [1, 3] {
        let service = env.spawn_with(&[
            ("HTTP_WORKERS", &workers.to_string()),
            ("CACHE_WARMUP_ORDERS", "0"),
        ]);
        service.wait_ready().await;
        assert_eq!(service.threads_named("http-"), workers);
        if workers == 1 {
            store_orders(&env, &orders).await;
        }
        let mut paths: Vec<(String, u16)> = orders
            .iter()
            .map(|(uid, _)| (format!("/order/{uid}"), 200))
            .collect();
        paths.extend([
            ("/order/not-anywhere".to_owned(), 404),
            ("/api/orders?limit=2".to_owned(), 200),
            ("/api/dead-letters?limit=2".to_owned(), 200),
            ("/api/dead-letters/t/0/0".to_owned(), 404),
            ("/readyz".to_owned(), 200),
            ("/healthz".to_owned(), 200),
            ("/metrics".to_owned(), 200),
            ("/".to_owned(), 200),
        ]);
        let requests = paths
            .iter()
            .cycle()
            .take(paths.len() * 25)
            .map(|(path, status)| {
                let request = service.client.get(service.url(path)).send();
                async move { (path, *status, request.await.unwrap().status().as_u16()) }
            });
        for (path, expected, status) in futures::future::join_all(requests).await {
            assert_eq!(status, expected, "{path} with {workers} worker(s)");
        }
        assert_serves(&service, &orders[0].0, &orders[0].1).await;

        let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_order-service"))
            .arg("serve")
            .env_clear()
            .envs(env.service_env())
            .env("HTTP_ADDR", &service.addr)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let status = second.wait().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(
            !status.success(),
            "a second instance on {}: {stderr}",
            service.addr
        );
        assert!(stderr.contains("HTTP_ADDR: cannot listen"), "{stderr}");
        assert!(service.terminate().success());
    }
}

/// A request whose database work hangs (its table locked) answers 504 at
/// HTTP_REQUEST_TIMEOUT_MS (with the security headers, counted in the
/// metrics), while the one worker goes on serving orders from memory; once the
/// lock is gone the same request answers again.
#[tokio::test]
async fn a_hung_database_times_requests_out_while_memory_still_answers() {
    let env = TestEnv::new().await;
    let service = env.spawn_with(&[("HTTP_REQUEST_TIMEOUT_MS", "1000"), ("HTTP_WORKERS", "1")]);
    service.wait_ready().await;
    let orders = generated_orders(93, 2);
    store_orders(&env, &orders).await;
    for (uid, _) in &orders {
        service.wait_for_order(uid, Duration::from_secs(10)).await;
    }

    let lock = env.lock_table("orders").await;
    let searches = async {
        let searches = (0..3).map(|_| service.get("/api/orders?customer_id=nobody"));
        let searches = futures::future::join_all(searches).await;
        (searches, std::time::Instant::now())
    };
    let from_memory = async {
        for (uid, bytes) in orders.iter().cycle().take(6) {
            assert_serves(&service, uid, bytes).await;
        }
        std::time::Instant::now()
    };
    let ((searches, timed_out_at), served_at) = futures::future::join(searches, from_memory).await;
    for search in searches {
        assert_eq!(search.status(), 504);
        // Answered like any other error: the security headers and a JSON body;
        // the client may try again shortly.
        assert_eq!(search.headers()["x-frame-options"], "DENY");
        assert_eq!(search.headers()["retry-after"], "1");
        let body: serde_json::Value = search.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("1000 ms"),
            "{body}"
        );
    }
    // and counted by route and status.
    let timed_out = r#"http_requests_total{route="/api/orders",status="504"}"#;
    assert_eq!(service.metric(timed_out).await, 3.0);
    assert!(
        served_at < timed_out_at,
        "memory answered while the searches hung"
    );
    // The server gives up the searches too (lock_timeout), while the lock is
    // still held: they keep no session from the pool ingest shares.
    let waiting = || async {
        let n = env
            .count(&format!(
                "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
                 WHERE d.datname = '{}' AND NOT l.granted",
                env.name
            ))
            .await;
        (n == 0).then_some(())
    };
    crate::helpers::eventually(Duration::from_secs(15), waiting, || {
        "the service's searches still wait on the lock".to_owned()
    })
    .await;
    lock.rollback().await.unwrap();
    let search = service.get("/api/orders?customer_id=nobody").await;
    assert_eq!(search.status(), 200);
}

/// A request body over the limit is refused before any handler runs, and that
/// answer, made by a layer inside the outermost one, still carries the
/// security headers and is counted by route and status.
#[tokio::test]
async fn a_body_over_the_limit_is_refused_counted_and_covered() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    let response = reqwest::Client::new()
        .get(service.url("/healthz"))
        .body(vec![b'x'; 64 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    let refused = r#"http_requests_total{route="/healthz",status="413"}"#;
    assert_eq!(service.metric(refused).await, 1.0);
}

/// HTTP/2 without TLS is served only when `HTTP_ALLOW_HTTP2` asks for it; by
/// default a connection is HTTP/1.1 from its first byte.
#[tokio::test]
async fn http2_is_served_only_when_allowed() {
    let env = TestEnv::new().await;
    let orders = generated_orders(92, 1);
    let (uid, produced) = &orders[0];
    for allowed in [false, true] {
        let service = env.spawn_with(&[("HTTP_ALLOW_HTTP2", &allowed.to_string())]);
        service.wait_ready().await;
        if !allowed {
            store_orders(&env, &orders).await;
        }
        assert_serves(&service, uid, produced).await;
        let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http::<axum::body::Body>();
        let request = axum::http::Request::get(service.url(&format!("/order/{uid}")))
            .body(axum::body::Body::empty())
            .unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), h2.request(request))
            .await
            .expect("an HTTP/2 request is answered or refused at once");
        match answer {
            Ok(response) if allowed => {
                assert_eq!(response.version(), axum::http::Version::HTTP_2);
                assert_eq!(response.status(), 200);
            }
            Ok(response) => panic!("HTTP/2 served by default: {response:?}"),
            Err(e) => assert!(!allowed, "HTTP/2 refused while allowed: {e}"),
        }
        assert!(service.terminate().success());
    }
}

/// PostgreSQL falls silent (connections open, nothing answers; its sessions
/// stay silent for good, as when its host is lost) under searches: each
/// answers 504 at HTTP_REQUEST_TIMEOUT_MS, and the sessions they met keep no
/// place in the pool: once the database answers again, so do the searches.
#[tokio::test]
async fn searches_recover_after_the_database_fell_silent() {
    let env = TestEnv::new().await;
    let (proxy, service) = env
        .spawn_behind_proxy(&[
            ("HTTP_REQUEST_TIMEOUT_MS", "1000"),
            ("DATABASE_MAX_CONNECTIONS", "2"),
        ])
        .await;
    service.wait_ready().await;
    let search = "/api/orders?customer_id=nobody";
    assert_eq!(service.get(search).await.status(), 200);
    // Its session back in the pool first: sqlx pings a session given back
    // with no bound once the service's own ping has passed (not ours to
    // change), and a silence falling between the two keeps its place.
    service.wait_pool_idle().await;

    proxy.silence();
    let searches = (0..4).map(|_| service.get(search));
    for response in futures::future::join_all(searches).await {
        assert_eq!(response.status(), 504);
    }
    proxy.restore();
    searches_answer_again(&service, search).await;
}

/// A search abandoned in the middle of its statement (it waited on a lock
/// when PostgreSQL fell silent for good) answers 504, and its session does
/// not keep its place in the pool for as long as the server stays silent:
/// with a pool of one, searches answer again within seconds of the database
/// (at the default INGEST_WRITE_TIMEOUT_MS of 30 s, which once bounded it).
#[tokio::test]
async fn a_search_abandoned_mid_statement_gives_its_session_back() {
    let env = TestEnv::new().await;
    let (proxy, service) = env
        .spawn_behind_proxy(&[
            ("HTTP_REQUEST_TIMEOUT_MS", "1000"),
            ("DATABASE_MAX_CONNECTIONS", "1"),
        ])
        .await;
    service.wait_ready().await;
    let search = "/api/orders?customer_id=nobody";
    let lock = env.lock_table("orders").await;
    let fall_silent = async {
        env.wait_for_lock_waiters(1).await;
        proxy.silence();
        lock.rollback().await.unwrap();
    };
    let (abandoned, ()) = futures::future::join(service.get(search), fall_silent).await;
    assert_eq!(abandoned.status(), 504);

    proxy.restore();
    searches_answer_again(&service, search).await;
}

/// Waits until `search` answers 200 again.
async fn searches_answer_again(service: &Service, search: &str) {
    let answers = || async { (service.get(search).await.status() == 200).then_some(()) };
    eventually(Duration::from_secs(20), answers, || {
        format!("searches never answered again:\n{}", service.log_text())
    })
    .await;
}

/// `HTTP_MAX_CONCURRENCY` bounds the instance, not each worker: with both
/// permits held by searches that hang on the database, an order in memory
/// waits for one of them to time out, whichever worker serves it.
#[tokio::test]
async fn the_concurrency_limit_is_one_for_all_workers() {
    let env = TestEnv::new().await;
    let service = env.spawn_with(&[
        ("HTTP_REQUEST_TIMEOUT_MS", "1000"),
        ("HTTP_WORKERS", "2"),
        ("HTTP_MAX_CONCURRENCY", "2"),
    ]);
    service.wait_ready().await;
    let orders = generated_orders(95, 1);
    store_orders(&env, &orders).await;
    let (uid, bytes) = &orders[0];
    service.wait_for_order(uid, Duration::from_secs(10)).await;

    let lock = env.lock_table("orders").await;
    let search = || async {
        let response = service.get("/api/orders?customer_id=nobody").await;
        (response.status().as_u16(), std::time::Instant::now())
    };
    let from_memory = async {
        // Both searches are in by now and hold the two permits.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_serves(&service, uid, bytes).await;
        std::time::Instant::now()
    };
    let ((first, second), served_at) =
        futures::future::join(futures::future::join(search(), search()), from_memory).await;
    assert_eq!((first.0, second.0), (504, 504));
    assert!(
        served_at >= first.1.min(second.1),
        "memory answered while both permits were held"
    );
    lock.rollback().await.unwrap();
}

/// A shell's low open-files limit is raised to the most allowed at start, and
/// clients get all of it but the files the service keeps (256 and the pool's
/// 8 sessions). An HTTP_MAX_CONNECTIONS above that share is kept, and told.
#[tokio::test]
async fn the_open_files_limit_is_raised_and_shared_out() {
    const TOO_MANY: &str = "more than the open-files limit leaves clients";
    let env = TestEnv::new().await;
    let service = Service::spawn_with_open_files(env.service_env(), 512, 4096);
    service.wait_ready().await;
    assert_eq!(service.open_files_limit(), 4096);
    assert_eq!(service.metric("http_connections_limit").await, 3832.0);
    assert!(service.log_text().contains("open-files limit raised"));
    assert!(!service.log_text().contains(TOO_MANY));
    drop(service);

    let mut settings = env.service_env();
    settings.push(("HTTP_MAX_CONNECTIONS".into(), "3833".into()));
    let service = Service::spawn_with_open_files(settings, 4096, 4096);
    // Not ready until the group lets the first instance's partition go.
    service
        .wait_for_log("listening on", Duration::from_secs(30))
        .await;
    assert_eq!(service.metric("http_connections_limit").await, 3833.0);
    let logs = service.log_text();
    assert!(
        logs.contains(TOO_MANY) && logs.contains("\"clients_files\":3832"),
        "{logs}"
    );
}

/// Past HTTP_MAX_CONNECTIONS a new connection waits, unanswered, until one of
/// those held closes; then it is served.
#[tokio::test]
async fn connections_past_the_limit_wait_for_one_to_close() {
    let env = TestEnv::new().await;
    let mut service = env.spawn_with(&[("HTTP_MAX_CONNECTIONS", "2")]);
    service.wait_ready().await;
    // Every request from here on its own connection, closed once answered:
    // the pool's idle one, dropped with its client, is closed now.
    service.client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    eventually(
        Duration::from_secs(10),
        || async { (service.metric("http_connections_open").await <= 1.0).then_some(()) },
        || "the probe's connection stayed open".into(),
    )
    .await;
    let mut feeds = vec![service.hold_feed().await, service.hold_feed().await];
    let waiting = service
        .client
        .get(service.url("/healthz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(
        waiting.is_err_and(|e| e.is_timeout()),
        "a third connection was served"
    );
    drop(feeds.remove(0));
    let served = service.get("/healthz").await;
    assert_eq!(served.status(), 200);
    assert_eq!(service.metric("http_connections_limit").await, 2.0);
}

/// Live feeds may hold all the connections but a quarter: past that a feed is
/// answered 503 at once, its connection closed, and other requests are served
/// while the feeds stay open; once one closes, a feed is accepted again.
#[tokio::test]
async fn live_feeds_past_their_share_are_refused_and_other_requests_served() {
    let env = TestEnv::new().await;
    let service = env.spawn_with(&[("HTTP_MAX_CONNECTIONS", "8")]);
    service.wait_ready().await;
    let mut feeds = Vec::new();
    for _ in 0..6 {
        let feed = service.get("/api/orders/stream").await;
        assert_eq!(feed.status(), 200);
        feeds.push(feed);
    }
    let refused = service.get("/api/orders/stream").await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "30");
    assert_eq!(refused.headers()["connection"], "close");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("live feeds"),
        "{body}"
    );
    for route in ["/healthz", "/readyz", "/metrics", "/"] {
        assert_eq!(service.get(route).await.status(), 200, "{route}");
    }
    assert_eq!(service.metric("http_live_feeds_open").await, 6.0);
    assert_eq!(service.metric("http_live_feeds_limit").await, 6.0);
    drop(feeds.pop());
    eventually(
        Duration::from_secs(10),
        || async { (service.get("/api/orders/stream").await.status() == 200).then_some(()) },
        || "no feed was accepted after one closed".into(),
    )
    .await;
}

/// Sessions idle in the pool when PostgreSQL fell silent for good (its host
/// lost: nothing answers on them, ever) are found out by the first request
/// after it answers again, which closes them all and answers from a new
/// session: six of them cost that request one ping, not a failed request
/// each (18 s of 503s before).
#[tokio::test]
async fn idle_sessions_that_fell_silent_cost_one_ping() {
    let env = TestEnv::new().await;
    let (proxy, service) = env.spawn_behind_proxy(&[]).await;
    service.wait_ready().await;
    let search = "/api/orders?customer_id=nobody";
    // Six searches held at once by a lock: six sessions, idle afterwards.
    let lock = env.lock_table("orders").await;
    let searches = futures::future::join_all((0..6).map(|_| service.get(search)));
    let release = async {
        env.wait_for_lock_waiters(6).await;
        lock.rollback().await.unwrap();
    };
    let (answers, ()) = futures::future::join(searches, release).await;
    assert!(answers.iter().all(|a| a.status() == 200));
    service.wait_pool_idle().await;

    proxy.silence();
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.restore();
    assert_eq!(service.get(search).await.status(), 200);
    service
        .wait_for_log("failed its ping", Duration::from_secs(10))
        .await;
    let logs = service.log_text();
    assert_eq!(logs.matches("failed its ping").count(), 1, "{logs}");
}
