//! The demo page is an app of its own beside the gateway: it answers only requests addressed to a
//! loopback name (DNS rebinding) and starts a flow only for a same-origin browser request (CSRF).

use reqwest::redirect::Policy;
use reqwest::StatusCode;

fn start_demo() -> finx_gateway::demo::Demo {
    let gateway = finx_gateway::reserve_port("127.0.0.1".parse().unwrap()).unwrap();
    let any = "127.0.0.1:0".parse().unwrap();
    finx_gateway::demo::start(gateway, any, any).expect("demo starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_refuses_foreign_hosts_and_cross_site_posts() {
    // `demo::start` runs its own runtime for seeding, so it cannot run on this one.
    let demo = tokio::task::spawn_blocking(start_demo).await.unwrap();
    let page = demo.page.base_url();
    let port = demo.page.addr().port();
    let http = reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap();

    let own = http.get(format!("{page}/demo")).send().await.unwrap();
    assert_eq!(own.status(), StatusCode::OK);
    let by_name = http
        .get(format!("{page}/demo"))
        .header("host", format!("localhost:{port}"))
        .send()
        .await
        .unwrap();
    assert_eq!(by_name.status(), StatusCode::OK);

    // A page on another site that rebound its name to 127.0.0.1.
    let rebound = http
        .get(format!("{page}/demo"))
        .header("host", format!("evil.example:{port}"))
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), StatusCode::MISDIRECTED_REQUEST);

    for (header, value) in [
        ("origin", "http://evil.example".to_owned()),
        ("sec-fetch-site", "cross-site".to_owned()),
    ] {
        let forged = http
            .post(format!("{page}/demo/connect"))
            .header(header, value)
            .send()
            .await
            .unwrap();
        assert_eq!(forged.status(), StatusCode::FORBIDDEN, "{header}");
    }
    let started = demo.sim.control().stats().await.unwrap();
    assert_eq!(started.widget_links_created, 0, "no flow was started");

    // The page's own form: the flow starts through the gateway, the browser goes to the widget.
    let own_post = http
        .post(format!("{page}/demo/connect"))
        .header("origin", page.clone())
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert!(own_post.status().is_redirection(), "{}", own_post.status());
    let location = own_post.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        location.starts_with(&demo.sim.base_url()),
        "to the widget: {location}"
    );
}
