//! Real PostgreSQL for tests: each test gets a database of its own, created on the server named
//! by `FINX_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) and
//! dropped when the test ends. A test that cannot reach the server fails loudly; it never skips.

use std::time::Duration;

use rand::distr::{Alphanumeric, SampleString};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// The server the tests use.
pub fn admin_url() -> String {
    std::env::var("FINX_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database that exists for one test.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    pub fn create() -> Self {
        let name = format!(
            "finx_test_{}",
            Alphanumeric
                .sample_string(&mut rand::rng(), 12)
                .to_lowercase()
        );
        let admin = admin_url();
        if let Err(e) = run_sql(&admin, &format!("CREATE DATABASE {name}")) {
            panic!(
                "this test needs PostgreSQL at FINX_TEST_DATABASE_URL (or the default \
                 postgres://postgres@127.0.0.1:5432/postgres) and could not create a database \
                 there: {e}"
            );
        }
        let mut url = url::Url::parse(&admin).expect("FINX_TEST_DATABASE_URL is a URL");
        url.set_path(&format!("/{name}"));
        Self {
            name,
            url: url.to_string(),
        }
    }

    /// Runs `sql` in this database.
    pub fn execute(&self, sql: &str) {
        run_sql(&self.url, sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// The first column of the first row of `sql`, as text.
    pub fn query_text(&self, sql: &str) -> Option<String> {
        let (url, sql) = (self.url.clone(), sql.to_owned());
        on_own_runtime(async move {
            let mut conn = PgConnection::connect(&url).await?;
            let value: Option<String> = sqlx::query_scalar(AssertSqlSafe(sql))
                .fetch_optional(&mut conn)
                .await?
                .flatten();
            conn.close().await?;
            Ok(value)
        })
        .expect("query")
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let _ = run_sql(
            &admin_url(),
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// Runs one statement on a connection of its own, from any thread or runtime.
pub fn run_sql(url: &str, sql: &str) -> Result<(), sqlx::Error> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    on_own_runtime(async move {
        let mut conn = tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(&url))
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??;
        sqlx::query(AssertSqlSafe(sql)).execute(&mut conn).await?;
        conn.close().await?;
        Ok(())
    })
}

fn on_own_runtime<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, sqlx::Error>> + Send + 'static,
) -> Result<T, sqlx::Error> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(work)
    })
    .join()
    .expect("database thread")
}

/// A TCP proxy in front of PostgreSQL that the test can take down (every open connection is cut,
/// new ones are refused) and bring back, standing in for a database outage or failover.
pub struct OutageProxy {
    pub addr: std::net::SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl OutageProxy {
    /// Starts forwarding to the test server's host and port.
    pub fn start() -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let target_url = url::Url::parse(&admin_url()).expect("database URL");
        let target = format!(
            "{}:{}",
            target_url.host_str().unwrap_or("127.0.0.1"),
            target_url.port().unwrap_or(5432)
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy binds");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("proxy address");
        let up = std::sync::Arc::new(AtomicBool::new(true));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (accept_up, accept_cut) = (up.clone(), cut.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let Ok((mut client, _)) = listener.accept().await else {
                        continue;
                    };
                    if !accept_up.load(Ordering::SeqCst) {
                        drop(client); // refused: the database is "down"
                        continue;
                    }
                    let target = target.clone();
                    let mut cut = accept_cut.subscribe();
                    tokio::spawn(async move {
                        let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cut.changed() => {} // both sockets drop: connection cut
                        }
                    });
                }
            });
        });
        Self { addr, up, cut }
    }

    /// `url` (a database URL) with its host and port replaced by this proxy's.
    pub fn route(&self, url: &str) -> String {
        let mut url = url::Url::parse(url).expect("database URL");
        url.set_host(Some("127.0.0.1")).expect("host");
        url.set_port(Some(self.addr.port())).expect("port");
        url.to_string()
    }

    /// Cuts every connection and refuses new ones until [`OutageProxy::restore`].
    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        self.cut.send_modify(|generation| *generation += 1);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
