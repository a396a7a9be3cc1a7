//! Certificates for TLS tests: a throwaway private CA with a server
//! certificate for 127.0.0.1 (made by openssl), and `redis-server` listening
//! with TLS only.

use super::{RedisServer, TempDir, free_port, openssl};

/// A throwaway CA, a server certificate it signed for 127.0.0.1, and a second,
/// unrelated CA; all made by openssl in a temp dir.
pub struct Pki {
    pub dir: TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = TempDir::new("redis-tls");
        for ca in ["ca", "other-ca"] {
            let (key, crt, subject) = (
                format!("{ca}.key"),
                format!("{ca}.crt"),
                format!("/CN=ws-notify test {ca}"),
            );
            openssl(
                &dir,
                &[
                    &new_p256_key(&key)[..],
                    &[
                        "-x509",
                        "-out",
                        &crt,
                        "-days",
                        "2",
                        "-subj",
                        &subject,
                        "-addext",
                        "basicConstraints=critical,CA:TRUE",
                        "-addext",
                        "keyUsage=critical,keyCertSign,cRLSign",
                    ],
                ]
                .concat(),
            );
        }
        openssl(
            &dir,
            &[
                &new_p256_key("server.key")[..],
                &["-out", "server.csr", "-subj", "/CN=127.0.0.1"],
            ]
            .concat(),
        );
        std::fs::write(
            dir.file("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
             basicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\n",
        )
        .expect("write extensions");
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ],
        );
        Pki { dir }
    }
}

/// `openssl req` arguments that make a new unencrypted P-256 key in `key_file`.
fn new_p256_key(key_file: &str) -> [&str; 8] {
    [
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        key_file,
    ]
}

/// `redis-server` with a TLS port (certificate from a [`Pki`]) besides the
/// plain port the harness itself uses to check readiness and to publish;
/// killed on drop.
pub struct TlsRedis {
    pub redis: RedisServer,
    pub tls_port: u16,
}

impl TlsRedis {
    pub fn start(pki: &Pki) -> TlsRedis {
        let tls_port = free_port();
        let (port, cert, key, ca) = (
            tls_port.to_string(),
            pki.dir.file_str("server.crt"),
            pki.dir.file_str("server.key"),
            pki.dir.file_str("ca.crt"),
        );
        let redis = RedisServer::start_with(
            &[
                "--tls-port",
                &port,
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
                "--tls-ca-cert-file",
                &ca,
                "--tls-auth-clients",
                "no",
            ],
            None,
            None,
        );
        TlsRedis { redis, tls_port }
    }

    /// `rediss://127.0.0.1:<tls port>/`
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.tls_port)
    }
}
