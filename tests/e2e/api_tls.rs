//! The edge serving HTTPS itself (`API_TLS_CERT`, `API_TLS_KEY`): a client that trusts only a
//! test CA gets through on TLS 1.3 and TLS 1.2, with the full chain sent; TLS 1.1 and plain
//! HTTP do not; a certificate file that is not there stops start-up, naming the setting.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use reqwest::StatusCode;
use reqwest::header::CONTENT_TYPE;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ProtocolVersion, RootCertStore, SupportedProtocolVersion};
use serde_json::Value;
use tempfile::TempDir;
use tests::harness::sim::{http_client, install_crypto_provider};
use tests::harness::{ApiProcess, AuthProcess, Process, SimProcess};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// How long any one exchange may take before the test gives up (a guard against hanging,
/// not something asserted).
const PATIENCE: Duration = Duration::from_secs(30);

/// A test CA and a server certificate it signed for `localhost` and 127.0.0.1, written as
/// PEM files: the chain (leaf first, then the CA) and the leaf's key.
struct Pki {
    dir: TempDir,
    ca_der: CertificateDer<'static>,
    ca_pem: String,
}

impl Pki {
    fn new() -> Self {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "wxauth e2e test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("self-signed CA");

        let mut leaf_params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("leaf params");
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        leaf_params.use_authority_key_identifier_extension = true;
        leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_key = KeyPair::generate().expect("leaf key");
        let leaf = leaf_params
            .signed_by(&leaf_key, &ca)
            .expect("leaf signed by the CA");

        let dir = tempfile::Builder::new()
            .prefix("wxauth-tls-")
            .tempdir()
            .expect("a temp dir");
        std::fs::write(
            dir.path().join("chain.pem"),
            format!("{}{}", leaf.pem(), ca.pem()),
        )
        .expect("write the chain");
        std::fs::write(dir.path().join("key.pem"), leaf_key.serialize_pem())
            .expect("write the key");
        Self {
            ca_der: ca.der().clone(),
            ca_pem: ca.pem(),
            dir,
        }
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join("chain.pem")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }

    /// A rustls client that trusts only this CA and speaks only `version`.
    fn connector(&self, version: &'static SupportedProtocolVersion) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca_der.clone())
            .expect("the CA is a trust anchor");
        let config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[version])
                .expect("the version is supported")
                .with_root_certificates(roots)
                .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }
}

/// Simulator, auth-service, and api-service serving HTTPS with `pki`'s certificate.
struct HttpsEdge {
    _sim: SimProcess,
    _auth: AuthProcess,
    api: ApiProcess,
    pki: Pki,
}

impl HttpsEdge {
    async fn start() -> Self {
        let pki = Pki::new();
        let sim = SimProcess::start().await.expect("simulator");
        let auth = AuthProcess::start(&sim, &[]).await.expect("auth-service");
        let (cert, key) = (pki.cert(), pki.key());
        let api = ApiProcess::start(
            &auth,
            &[
                ("API_TLS_CERT", &cert.display().to_string()),
                ("API_TLS_KEY", &key.display().to_string()),
            ],
        )
        .await
        .expect("api-service");
        Self {
            _sim: sim,
            _auth: auth,
            api,
            pki,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.api.addr()
    }

    /// A reqwest client that trusts only the test CA, with `localhost` pinned to the edge.
    fn https_client(&self) -> reqwest::Client {
        install_crypto_provider();
        let ca = reqwest::Certificate::from_pem(self.pki.ca_pem.as_bytes()).expect("CA PEM");
        reqwest::Client::builder()
            .no_proxy()
            .timeout(PATIENCE)
            .resolve("localhost", self.addr())
            .tls_certs_only([ca])
            .build()
            .expect("an HTTPS client")
    }

    fn https_url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr().port())
    }

    /// A TLS connection limited to `version`, as far as the handshake gets.
    async fn handshake(
        &self,
        version: &'static SupportedProtocolVersion,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr()).await?;
        let name = ServerName::try_from("localhost").expect("a DNS name");
        tokio::time::timeout(PATIENCE, self.pki.connector(version).connect(name, tcp))
            .await
            .map_err(std::io::Error::other)?
    }
}

/// `GET /healthz` over an established TLS stream, HTTP/1.1 by hand; the whole answer.
async fn healthz_over(mut tls: tokio_rustls::client::TlsStream<TcpStream>) -> String {
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("send a request");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(PATIENCE, tls.read_to_end(&mut answer))
        .await
        .expect("the server answers");
    // A server may close without close_notify after `Connection: close`; what came is enough.
    if let Err(e) = read {
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// A TLS 1.1 ClientHello: record version 0x0302, client_version 0x0302, 32 random bytes, no
/// session id, TLS_RSA_WITH_AES_128_CBC_SHA and TLS_RSA_WITH_AES_256_CBC_SHA, null
/// compression, no extensions.
fn tls11_client_hello() -> Vec<u8> {
    let mut random = [0u8; 32];
    getrandom::fill(&mut random).expect("random bytes");
    let mut hello = vec![0x03, 0x02];
    hello.extend_from_slice(&random);
    hello.push(0x00); // session id: empty
    hello.extend_from_slice(&[0x00, 0x04, 0x00, 0x2f, 0x00, 0x35]); // cipher suites
    hello.extend_from_slice(&[0x01, 0x00]); // compression methods: null
    let len = u32::try_from(hello.len()).expect("small");
    let mut handshake = vec![0x01]; // ClientHello
    handshake.extend_from_slice(&len.to_be_bytes()[1..]);
    handshake.extend_from_slice(&hello);
    let len = u16::try_from(handshake.len()).expect("small");
    let mut record = vec![0x16, 0x03, 0x02]; // handshake record, TLS 1.1
    record.extend_from_slice(&len.to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

#[tokio::test]
async fn https_with_a_client_that_trusts_only_the_ca_gets_healthz() {
    // Arrange
    let edge = HttpsEdge::start().await;
    let client = edge.https_client();

    // Act: readiness first (the harness leaves it to us under TLS), then /healthz.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let ready = client.get(edge.https_url("/readyz")).send().await;
        if matches!(&ready, Ok(r) if r.status() == StatusCode::OK) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "api-service never became ready over HTTPS: {ready:?}\n{}",
            edge.api.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answer = client
        .get(edge.https_url("/healthz"))
        .send()
        .await
        .expect("an HTTPS answer");

    // Assert
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(
        answer
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        Some("application/json; charset=utf-8")
    );
    assert!(answer.headers().contains_key("x-request-id"));
    let body: Value =
        serde_json::from_slice(&answer.bytes().await.expect("a body")).expect("a JSON body");
    assert!(body.is_object(), "{body}");
}

#[tokio::test]
async fn tls_13_and_tls_12_are_accepted_with_the_full_chain() {
    // Arrange
    let edge = HttpsEdge::start().await;

    for (version, expected) in [
        (&rustls::version::TLS13, ProtocolVersion::TLSv1_3),
        (&rustls::version::TLS12, ProtocolVersion::TLSv1_2),
    ] {
        // Act
        let tls = edge
            .handshake(version)
            .await
            .unwrap_or_else(|e| panic!("the {expected:?} handshake fails: {e}"));

        // Assert: that version, the chain as configured (leaf, then CA), and a working
        // HTTP exchange over it.
        let (_, conn) = tls.get_ref();
        assert_eq!(conn.protocol_version(), Some(expected));
        let chain = conn.peer_certificates().expect("the server's certificates");
        assert_eq!(chain.len(), 2, "leaf and CA");
        assert_eq!(chain[1], edge.pki.ca_der);
        let answer = healthz_over(tls).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{expected:?}: {answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("content-type: application/json; charset=utf-8"),
            "{answer}"
        );
    }
}

#[tokio::test]
async fn tls_11_gets_no_server_hello() {
    // Arrange
    let edge = HttpsEdge::start().await;
    let mut tcp = TcpStream::connect(edge.addr()).await.expect("connect");

    // Act
    tcp.write_all(&tls11_client_hello())
        .await
        .expect("send the ClientHello");
    let mut head = [0u8; 7];
    let mut got = 0;
    let read = tokio::time::timeout(PATIENCE, async {
        while got < head.len() {
            match tcp.read(&mut head[got..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    })
    .await;

    // Assert: a fatal alert, or the connection closed; never a handshake record.
    assert!(read.is_ok(), "the server neither answered nor closed");
    if got > 0 {
        assert_eq!(
            head[0],
            0x15,
            "expected an alert record, got {:02x?}",
            &head[..got]
        );
        if got == head.len() {
            assert_eq!(head[5], 2, "the alert is fatal: {head:02x?}");
        }
    }
}

#[tokio::test]
async fn plain_http_to_the_https_port_gets_no_200() {
    // Arrange
    let edge = HttpsEdge::start().await;
    let plain = http_client(PATIENCE).expect("a plain HTTP client");

    // Act
    let answer = plain
        .get(format!("http://{}/healthz", edge.addr()))
        .send()
        .await;

    // Assert
    if let Ok(r) = answer {
        assert_ne!(r.status(), StatusCode::OK);
    }
}

#[tokio::test]
async fn a_missing_certificate_file_stops_start_up_naming_api_tls_cert() {
    // Arrange: a valid key, but no certificate where API_TLS_CERT points.
    let pki = Pki::new();
    let missing = pki.dir.path().join("no-such-chain.pem");
    let env: Vec<(String, String)> = [
        ("API_HTTP_ADDR", "127.0.0.1:0".to_owned()),
        ("API_METRICS_ADDR", "127.0.0.1:0".to_owned()),
        ("API_AUTH_URL", "http://127.0.0.1:1".to_owned()),
        (
            "API_DATABASE_URL",
            format!("sqlite://{}", pki.dir.path().join("api.db").display()),
        ),
        ("API_TLS_CERT", missing.display().to_string()),
        ("API_TLS_KEY", pki.key().display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();

    // Act
    let mut process = Process::spawn("api-service", &env, pki.dir.path()).expect("spawn");
    let code = process.wait_exit(PATIENCE).await.expect("it exits");

    // Assert
    assert!(matches!(code, Some(c) if c != 0), "exit code {code:?}");
    // The last lines may still be in the pipe when the exit is seen.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut logs = process.logs().join("\n");
    while !logs.contains("API_TLS_CERT") && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        logs = process.logs().join("\n");
    }
    assert!(logs.contains("API_TLS_CERT"), "{logs}");
}
