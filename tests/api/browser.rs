//! The web page in a real headless Chromium, driven over WebDriver.
//! Screenshots are saved under artifacts/screenshots/.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;

use crate::helpers::{eventually, sample_with_uid, Service, TestEnv};

struct Browser {
    client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Debian's packages by default; elsewhere (Ubuntu ships only snap
        // stubs) TEST_CHROMEDRIVER and TEST_CHROMIUM name a matching pair.
        let chromedriver =
            std::env::var("TEST_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let chromium =
            std::env::var("TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{chromedriver}: {e} (scripts/stack test installs Debian's; TEST_CHROMEDRIVER names another)")
            });
        let profile = tempfile::tempdir().unwrap();
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run",
                    "--window-size=1200,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = loop {
            match ClientBuilder::new(HttpConnector::new())
                .capabilities(capabilities.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(client) => break client,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => panic!("cannot start a browser session: {e}"),
            }
        };
        Self {
            client,
            driver,
            _profile: profile,
        }
    }

    async fn screenshot(&self, name: &str) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("artifacts/screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    async fn text_of(&self, css: &str) -> String {
        let element = self
            .client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css(css))
            .await
            .unwrap();
        element.text().await.unwrap()
    }

    /// Waits until the element's text contains `expected`.
    async fn wait_text(&self, css: &str, expected: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(element) = self.client.find(Locator::Css(css)).await {
                let text = element.text().await.unwrap_or_default();
                if text.contains(expected) {
                    return text;
                }
                assert!(
                    Instant::now() < deadline,
                    "{css} shows {text:?}, not {expected:?}"
                );
            }
            assert!(Instant::now() < deadline, "{css} never appeared");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn search(&self, uid: &str) {
        let input = self.client.find(Locator::Id("uid")).await.unwrap();
        input.clear().await.unwrap();
        input.send_keys(uid).await.unwrap();
        self.client
            .find(Locator::Css("#search button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

async fn service_with_orders(env: &TestEnv, uids: &[&str]) -> Service {
    let service = env.spawn();
    service.wait_ready().await;
    for uid in uids {
        let order = sample_with_uid(uid).to_string();
        env.produce(&[(Some(uid), order.as_bytes())]).await;
        service.wait_for_order(uid, Duration::from_secs(30)).await;
    }
    service
}

#[tokio::test]
async fn a_person_finds_and_reads_an_order() {
    let env = TestEnv::new().await;
    let service = service_with_orders(&env, &["browser-order-1"]).await;
    let browser = Browser::start().await;
    browser.client.goto(&service.url("/")).await.unwrap();
    browser.search("browser-order-1").await;
    browser.wait_text("#order h1", "browser-order-1").await;
    let card = browser.text_of("#order").await;
    for expected in [
        "WBILMTESTTRACK",
        "meest",
        "Test Testov",
        "+9720000000",
        "test@gmail.com",
        "Kiryat Mozkin",
        "1,817 USD",
        "wbpay",
        "alpha",
        "Mascaras",
        "Vivienne Sabo",
        "317",
    ] {
        assert!(
            card.contains(expected),
            "{expected:?} missing from the card:\n{card}"
        );
    }
    assert!(browser
        .client
        .current_url()
        .await
        .unwrap()
        .path()
        .ends_with("/orders/browser-order-1"));
    browser.screenshot("order-card").await;

    browser.search("no-such-order").await;
    browser
        .wait_text("#status", "No order with id no-such-order")
        .await;
    browser.screenshot("not-found").await;

    browser.search("bad id!").await;
    browser
        .wait_text(
            "#status",
            "Nothing found for bad id!: it is not a valid order id",
        )
        .await;
    browser.screenshot("invalid-id").await;

    // Back returns to the order.
    browser.client.back().await.unwrap();
    browser.client.back().await.unwrap();
    browser.wait_text("#order h1", "browser-order-1").await;
    browser.close().await;
}

#[tokio::test]
async fn markup_in_an_order_is_shown_as_text_and_never_runs() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    let mut order = sample_with_uid("xss-order");
    order["items"][0]["name"] = "<script>alert(1)</script>".into();
    order["items"][0]["brand"] = "<img src=x onerror=alert(2)>".into();
    order["delivery"]["name"] = "<b>bold</b>".into();
    env.produce(&[(Some("xss-order"), order.to_string().as_bytes())])
        .await;
    service
        .wait_for_order("xss-order", Duration::from_secs(30))
        .await;

    let browser = Browser::start().await;
    // A deep link opens the order directly.
    browser
        .client
        .goto(&service.url("/orders/xss-order"))
        .await
        .unwrap();
    let card = browser
        .wait_text("#order", "<script>alert(1)</script>")
        .await;
    assert!(card.contains("<img src=x onerror=alert(2)>"));
    assert!(card.contains("<b>bold</b>"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        browser.client.get_alert_text().await.is_err(),
        "a dialog opened"
    );
    let scripts = browser
        .client
        .find_all(Locator::Css("#order script, #order img, #order b"))
        .await
        .unwrap();
    assert!(scripts.is_empty(), "markup from the order became elements");
    browser.screenshot("xss-as-text").await;
    browser.close().await;
}

#[tokio::test]
async fn the_recent_list_grows_while_orders_arrive() {
    let env = TestEnv::new().await;
    let service = service_with_orders(&env, &["live-before"]).await;
    let browser = Browser::start().await;
    browser
        .client
        .goto(&service.url("/?id=live-before"))
        .await
        .unwrap();
    browser.wait_text("#order h1", "live-before").await;
    browser.wait_text("#recent-list", "live-before").await;
    // Wait for the live feed to connect before producing.
    let deadline = Instant::now() + Duration::from_secs(10);
    while browser.client.find(Locator::Css("#live.on")).await.is_err() {
        assert!(Instant::now() < deadline, "the live feed never connected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let order = sample_with_uid("live-after").to_string();
    env.produce(&[(Some("live-after"), order.as_bytes())]).await;
    browser.wait_text("#recent-list", "live-after").await;
    browser.screenshot("live-list").await;
    // Clicking an entry of the list opens it.
    browser
        .client
        .find(Locator::Css("a[data-uid='live-after']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser.wait_text("#order h1", "live-after").await;
    browser.close().await;
}

/// A page opened while as many live feeds are open as the service allows is
/// refused its feed (503); it tries again 30 s later and then follows orders
/// as they arrive.
#[tokio::test]
async fn a_page_refused_its_live_feed_follows_orders_once_one_is_free() {
    let env = TestEnv::new().await;
    // 40 connections: 30 for feeds, 10 left for the page's own requests.
    let service = env.spawn_with(&[("HTTP_MAX_CONNECTIONS", "40")]);
    service.wait_ready().await;
    let mut held = Vec::new();
    for _ in 0..30 {
        held.push(service.hold_feed().await);
    }
    eventually(
        Duration::from_secs(10),
        || async { (service.metric("http_live_feeds_open").await >= 30.0).then_some(()) },
        || "the held feeds never all opened".into(),
    )
    .await;
    let browser = Browser::start().await;
    browser.client.goto(&service.url("/")).await.unwrap();
    browser.text_of("#recent-list").await;
    // Its feed is refused: the page is up, the feed is not.
    // Read from the text: the series exists only once a feed is refused.
    eventually(
        Duration::from_secs(10),
        || async {
            let metrics = service.get("/metrics").await.text().await.unwrap();
            metrics
                .contains(r#"http_requests_total{route="/api/orders/stream",status="503"} 1"#)
                .then_some(())
        },
        || "the page's feed was never refused".into(),
    )
    .await;
    assert!(browser.client.find(Locator::Css("#live.on")).await.is_err());

    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(45);
    while browser.client.find(Locator::Css("#live.on")).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the page never tried its feed again"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let order = sample_with_uid("after-refusal").to_string();
    env.produce(&[(Some("after-refusal"), order.as_bytes())])
        .await;
    browser.wait_text("#recent-list", "after-refusal").await;
    browser.close().await;
}

#[tokio::test]
async fn a_person_finds_orders_without_their_id_and_reads_why_one_was_rejected() {
    let env = TestEnv::new().await;
    let service = service_with_orders(&env, &["browser-a", "browser-b"]).await;
    let mut rejected = sample_with_uid("browser-rejected");
    rejected["payment"]["amount"] = (-1).into();
    let hostile = br#"{"order_uid":"browser-xss","entry":"<img src=x onerror=alert(3)>""#;
    env.produce(&[
        (Some("browser-rejected"), rejected.to_string().as_bytes()),
        (None, hostile),
    ])
    .await;
    env.wait_for_count(
        "SELECT count(*) FROM dead_letters",
        2,
        Duration::from_secs(30),
    )
    .await;

    let browser = Browser::start().await;
    browser.client.goto(&service.url("/")).await.unwrap();
    // The sample's track number, shared by both orders.
    browser.search("WBILMTESTTRACK").await;
    let results = browser.wait_text("#results", "browser-a").await;
    assert!(
        results.contains("browser-b") && results.contains("2 orders"),
        "{results}"
    );
    browser.screenshot("found-by-track-number").await;

    browser.search("browser-rejected").await;
    let why = browser.wait_text("#status", "was not stored").await;
    assert!(
        why.contains("validate") && why.contains("payment.amount"),
        "{why}"
    );
    browser.screenshot("rejected-order").await;

    browser
        .client
        .find(Locator::Id("nav-rejected"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let letters = browser.wait_text("#letters", "browser-xss").await;
    assert!(letters.contains("browser-rejected"), "{letters}");
    browser
        .client
        .find(Locator::Id("stage"))
        .await
        .unwrap()
        .select_by_value("parse")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while browser
        .text_of("#letters")
        .await
        .contains("browser-rejected")
    {
        assert!(Instant::now() < deadline, "the stage filter did not apply");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(browser
        .client
        .current_url()
        .await
        .unwrap()
        .as_str()
        .ends_with("/rejected?stage=parse"));
    browser
        .client
        .find(Locator::Css("#letters .letter button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .wait_text("#letters .payload", "<img src=x onerror=alert(3)>")
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        browser.client.get_alert_text().await.is_err(),
        "a dialog opened"
    );
    let elements = browser
        .client
        .find_all(Locator::Css("#letters img"))
        .await
        .unwrap();
    assert!(elements.is_empty(), "markup from a payload became elements");
    browser.screenshot("rejected-list").await;
    browser.close().await;
}
