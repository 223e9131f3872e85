//! nginx as the reference keep-alive reverse proxy: it maps `X-Finx-User` to a static
//! `Authorization` header (a `map` written into its config), drops the caller's headers like
//! the gateway does and keeps upstream connections alive. Runs as a non-daemon child process on
//! 127.0.0.1 with its config, pid and error log in a temp dir; stopped (SIGTERM, then SIGKILL
//! after a deadline) on drop.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The nginx binary on `PATH` (or in `/usr/sbin`), if installed.
pub fn find_nginx() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file())
}

/// A running nginx master process and its workers.
pub struct Nginx {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx with `workers` worker processes in front of `upstream`; `bearer_for_user`
    /// lists `(user, "Bearer …")` pairs for the header map.
    pub fn start(
        binary: &PathBuf,
        upstream: SocketAddr,
        workers: usize,
        bearer_for_user: &[(String, String)],
    ) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("finx-bench-nginx-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        // Workers drop root privileges; they only need to reach their temp paths.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        let addr = finx_gateway::reserve_port(upstream.ip()).map_err(|e| e.to_string())?;
        let root = dir.path().display().to_string();
        let mut map = String::new();
        for (user, bearer) in bearer_for_user {
            let _ = writeln!(map, "    \"{user}\" \"{bearer}\";");
        }
        let conf = format!(
            r#"daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 65536;
pid {root}/nginx.pid;
error_log {root}/error.log error;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  client_body_temp_path {root}/body;
  proxy_temp_path {root}/proxy;
  fastcgi_temp_path {root}/fastcgi;
  uwsgi_temp_path {root}/uwsgi;
  scgi_temp_path {root}/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 75s;
  map_hash_max_size 262144;
  map_hash_bucket_size 256;
  map $http_x_finx_user $finx_authorization {{
    default "";
{map}  }}
  upstream finx {{
    server {upstream};
    keepalive 128;
    keepalive_requests 10000000;
  }}
  server {{
    listen {addr};
    location / {{
      proxy_pass http://finx;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host "{upstream}";
      proxy_set_header Authorization $finx_authorization;
      proxy_set_header X-Finx-User "";
    }}
  }}
}}
"#
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
        let child = Command::new(binary)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run nginx: {e}"))?;
        let mut nginx = Self {
            child,
            addr,
            _dir: dir,
        };
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                let log = std::fs::read_to_string(nginx._dir.path().join("error.log"))
                    .unwrap_or_default();
                return Err(format!("nginx exited at start ({status}): {log}"));
            }
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(nginx);
            }
            if Instant::now() >= until {
                return Err("nginx did not accept connections within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The master process; its workers are its children.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM asks the master for a fast shutdown, which also stops its workers.
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling the child this struct started.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
