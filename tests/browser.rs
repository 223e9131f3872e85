//! Pages in a real browser: headless Chromium (Debian's `chromium`, driven through
//! `chromedriver`).
//!
//! - The demo page: clicks "Connect bank", completes the simulator's widget, comes back through
//!   the gateway's callback and sees the accounts fetched through the gateway.
//! - The admin status page: an operator logs in through the form and sees the connections,
//!   never a token.
//!
//! `.ci/run` installs `chromium` and `chromium-driver`; without them these tests fail, loudly.

mod support;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{ClientBuilder, Locator};

/// chromedriver on a free loopback port; killed on drop.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Self {
        let binary = which("chromedriver").unwrap_or_else(|| {
            panic!("chromedriver is not installed: `apt-get install chromium chromium-driver` (bash .ci/run does it)")
        });
        assert!(
            which("chromium").is_some(),
            "chromium is not installed: `apt-get install chromium` (bash .ci/run does it)"
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        finx_gateway::wait_until_accepting(([127, 0, 0, 1], port).into(), Duration::from_secs(20))
            .expect("chromedriver listens");
        Self { child, port }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| std::path::Path::new(dir).join(program))
        .find(|path| path.is_file())
}

/// Finds the element with `id` and clicks it, retrying while the page is still being replaced
/// (a click on an element of the page being left fails as stale).
async fn click_when_present(
    browser: &fantoccini::Client,
    id: &str,
) -> Result<(), fantoccini::error::CmdError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = async { browser.find(Locator::Id(id)).await?.click().await }.await;
        match attempt {
            Ok(()) => return Ok(()),
            Err(error) if Instant::now() >= deadline => return Err(error),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A headless Chromium session through `driver`, with its profile in `profile`.
async fn open_browser(driver: &Driver, profile: &std::path::Path) -> fantoccini::Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": which("chromium").unwrap(),
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-quic",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    ClientBuilder::rustls()
        .expect("TLS setup")
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("browser session")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_connects_a_bank_on_the_demo_page_and_sees_their_accounts() {
    let listen = finx_gateway::reserve_port("127.0.0.1".parse().unwrap()).unwrap();
    // `demo::start` runs its own runtime for seeding, so it cannot run on this one.
    let page: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let demo = tokio::task::spawn_blocking(move || finx_gateway::demo::start(listen, page, page))
        .await
        .unwrap()
        .expect("demo starts");
    let driver = Driver::start();
    let profile = tempfile::tempdir().unwrap();
    let browser = open_browser(&driver, profile.path()).await;

    let result = async {
        browser
            .goto(&format!("{}/demo", demo.page.base_url()))
            .await?;
        click_when_present(&browser, "connect-bank").await?;
        // The simulator's widget: the bank stand-in.
        click_when_present(&browser, "connect").await?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let url = browser.current_url().await?;
            let page = browser.source().await?;
            if url.path() == "/demo/done" && page.contains("id=\"accounts\"") {
                return Ok::<_, fantoccini::error::CmdError>((page, url));
            }
            assert!(
                Instant::now() < deadline,
                "never reached the accounts page; at {url}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    .await;
    let screenshot = browser.screenshot().await.ok();
    browser.close().await.ok();
    if let Some(png) = screenshot {
        let _ = std::fs::create_dir_all("target/browser");
        let _ = std::fs::write("target/browser/demo-done.png", png);
    }
    let (page, url) = result.expect("the demo flow completes in the browser");

    assert!(url.path() == "/demo/done", "{url}");
    assert!(
        url.query_pairs().all(|(name, _)| name != "code"),
        "the code reached the page: {url}"
    );
    assert!(
        page.contains("IBAN") && page.contains("Giro account"),
        "accounts shown: {page}"
    );
    let stats = demo.sim.control().stats().await.unwrap();
    assert_eq!(stats.code_grants, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_logs_in_to_the_status_page_and_sees_connections_but_no_token() {
    let harness = support::Harness::start();
    let (access, refresh) = harness.seed_user("alice").await;
    let admin = harness.gateway().admin_url();
    let canary = format!("canary-{:016x}-browser", rand::random::<u64>());
    let imported = reqwest::Client::new()
        .post(format!("{admin}/admin/connections/browser-imported/import"))
        .bearer_auth(support::ADMIN_TOKEN)
        .json(&serde_json::json!({ "refresh_token": canary }))
        .send()
        .await
        .expect("admin API answers");
    assert_eq!(imported.status(), reqwest::StatusCode::OK);

    let driver = Driver::start();
    let profile = tempfile::tempdir().unwrap();
    let browser = open_browser(&driver, profile.path()).await;
    let result = async {
        // Not logged in: the page sends the browser to the login form.
        browser.goto(&format!("{admin}/admin/")).await?;
        let url = browser.current_url().await?;
        assert_eq!(url.path(), "/admin/login", "{url}");
        browser
            .find(Locator::Id("credential"))
            .await?
            .send_keys(support::ADMIN_TOKEN)
            .await?;
        click_when_present(&browser, "login").await?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let page = loop {
            let url = browser.current_url().await?;
            let page = browser.source().await?;
            if url.path() == "/admin/" && page.contains("id=\"near-lapse\"") {
                break page;
            }
            assert!(
                Instant::now() < deadline,
                "never reached the status page; at {url}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if let Ok(png) = browser.screenshot().await {
            let _ = std::fs::create_dir_all("target/browser");
            let _ = std::fs::write("target/browser/admin-status.png", png);
        }
        // The session opens the page only, not the API.
        browser.goto(&format!("{admin}/admin/connections")).await?;
        let api = browser.source().await?;
        Ok::<_, fantoccini::error::CmdError>((page, api))
    }
    .await;
    let screenshot = browser.screenshot().await.ok();
    browser.close().await.ok();
    if let (Err(_), Some(png)) = (&result, screenshot) {
        let _ = std::fs::create_dir_all("target/browser");
        let _ = std::fs::write("target/browser/admin-failed.png", png);
    }
    let (page, api) = result.expect("the operator reaches the status page");

    assert!(
        page.contains("browser-imported"),
        "the imported connection is listed: {page}"
    );
    assert!(page.contains("alice"), "{page}");
    assert!(page.contains("90-day limit"), "{page}");
    for secret in [
        canary.as_str(),
        access.as_str(),
        refresh.as_str(),
        support::ADMIN_TOKEN,
    ] {
        assert!(!page.contains(secret), "the page holds a secret: {page}");
    }
    assert!(api.contains("admin_unauthenticated"), "{api}");
    assert!(!api.contains("browser-imported"), "{api}");
}
