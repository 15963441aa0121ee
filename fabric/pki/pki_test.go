package pki_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/onebox-project/onebox/fabric/pki"
)

const (
	fp64  = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	sec32 = "00112233445566778899aabbccddeeff"
)

func TestParseToken(t *testing.T) {
	tests := []struct {
		name   string
		in     string
		ok     bool
		fp     string
		secret string
	}{
		{"valid", "obx1." + fp64 + "." + sec32, true, fp64, sec32},
		{"surrounding whitespace trimmed", " \t obx1." + fp64 + "." + sec32 + "\r\n", true, fp64, sec32},
		{"upper-case hex lowered", "obx1." + strings.ToUpper(fp64) + "." + strings.ToUpper(sec32), true, fp64, sec32},
		{"mixed-case hex lowered", "obx1." + "ABCDEF" + fp64[6:] + "." + "AbCd" + sec32[4:], true, "abcdef" + fp64[6:], "abcd" + sec32[4:]},
		{"empty", "", false, "", ""},
		{"only whitespace", "  \n", false, "", ""},
		{"wrong prefix", "obx2." + fp64 + "." + sec32, false, "", ""},
		{"prefix is case-sensitive", "OBX1." + fp64 + "." + sec32, false, "", ""},
		{"no prefix", fp64 + "." + sec32, false, "", ""},
		{"fingerprint too short", "obx1." + fp64[:63] + "." + sec32, false, "", ""},
		{"fingerprint too long", "obx1." + fp64 + "0." + sec32, false, "", ""},
		{"secret too short", "obx1." + fp64 + "." + sec32[:31], false, "", ""},
		{"secret too long", "obx1." + fp64 + "." + sec32 + "0", false, "", ""},
		{"fields swapped", "obx1." + sec32 + "." + fp64, false, "", ""},
		{"non-hex in fingerprint", "obx1." + "g" + fp64[1:] + "." + sec32, false, "", ""},
		{"non-hex in secret", "obx1." + fp64 + "." + sec32[:31] + "z", false, "", ""},
		{"trailing dot", "obx1." + fp64 + "." + sec32 + ".", false, "", ""},
		{"extra field", "obx1." + fp64 + "." + sec32 + ".00", false, "", ""},
		{"double dot", "obx1.." + fp64 + "." + sec32, false, "", ""},
		{"missing secret", "obx1." + fp64, false, "", ""},
		{"inner whitespace", "obx1. " + fp64 + "." + sec32, false, "", ""},
		{"non-ASCII", "obx1." + fp64[:62] + "é." + sec32, false, "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tok, err := pki.ParseToken(tt.in)
			if !tt.ok {
				if !errors.Is(err, pki.ErrBadToken) {
					t.Fatalf("ParseToken(%q) = %+v, %v; want ErrBadToken", tt.in, tok, err)
				}
				if tok != (pki.Token{}) {
					t.Errorf("ParseToken(%q) returned a non-zero token %+v with its error", tt.in, tok)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseToken(%q): %v", tt.in, err)
			}
			if tok.CAFingerprint != tt.fp || tok.Secret != tt.secret {
				t.Errorf("ParseToken(%q) = %+v; want fingerprint %s, secret %s", tt.in, tok, tt.fp, tt.secret)
			}
			if want := "obx1." + tt.fp + "." + tt.secret; tok.String() != want {
				t.Errorf("String() = %q, want %q", tok.String(), want)
			}
			if tok.ClusterID() != tt.fp[:16] {
				t.Errorf("ClusterID() = %q, want %q", tok.ClusterID(), tt.fp[:16])
			}
		})
	}
}

func TestTokenSecretMatches(t *testing.T) {
	tok := pki.Token{CAFingerprint: fp64, Secret: sec32}
	for _, tt := range []struct {
		in   string
		want bool
	}{
		{sec32, true},
		{strings.ToUpper(sec32), true}, // a user may retype the token in capitals
		{"", false},
		{sec32[:31], false},
		{sec32 + "0", false},
		{"f" + sec32[1:], false},
	} {
		if got := tok.SecretMatches(tt.in); got != tt.want {
			t.Errorf("SecretMatches(%q) = %v, want %v", tt.in, got, tt.want)
		}
	}
}

func TestNewTokenNamesTheCA(t *testing.T) {
	ca := newCA(t)
	tok, err := pki.NewToken(ca.Cert)
	if err != nil {
		t.Fatal(err)
	}
	if tok.CAFingerprint != ca.Fingerprint() || tok.ClusterID() != ca.ClusterID() {
		t.Errorf("token %+v does not name CA %s", tok, ca.Fingerprint())
	}
	back, err := pki.ParseToken(tok.String())
	if err != nil || back != tok {
		t.Errorf("ParseToken(String()) = %+v, %v; want %+v", back, err, tok)
	}
	tok2, err := pki.NewToken(ca.Cert)
	if err != nil {
		t.Fatal(err)
	}
	if tok2.Secret == tok.Secret {
		t.Error("two tokens for the same CA share a secret")
	}
}

func FuzzParseToken(f *testing.F) {
	f.Add("obx1." + fp64 + "." + sec32)
	f.Add(" obx1." + strings.ToUpper(fp64) + "." + sec32 + "\n")
	f.Add("obx1..")
	f.Add("obx1." + fp64 + "." + sec32 + ".")
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		tok, err := pki.ParseToken(s)
		if err != nil {
			if !errors.Is(err, pki.ErrBadToken) {
				t.Fatalf("ParseToken(%q) error %v is not ErrBadToken", s, err)
			}
			return
		}
		if !isLowerHex(tok.CAFingerprint, 64) || !isLowerHex(tok.Secret, 32) {
			t.Fatalf("ParseToken(%q) accepted a token with fields %q, %q", s, tok.CAFingerprint, tok.Secret)
		}
		if !strings.EqualFold(tok.String(), strings.TrimSpace(s)) {
			t.Fatalf("String() = %q is not the input %q", tok.String(), s)
		}
		back, err := pki.ParseToken(tok.String())
		if err != nil || back != tok {
			t.Fatalf("round trip of %q: %+v, %v; want %+v", s, back, err, tok)
		}
		_ = tok.ClusterID()
	})
}

func isLowerHex(s string, n int) bool {
	if len(s) != n {
		return false
	}
	for _, r := range s {
		if !(r >= '0' && r <= '9' || r >= 'a' && r <= 'f') {
			return false
		}
	}
	return true
}

func TestValidNodeName(t *testing.T) {
	tests := []struct {
		name string
		ok   bool
	}{
		{"a", true},
		{"Z", true},
		{"7", true},
		{"node-1", true},
		{"node_1", true},
		{"n1.example.com", true},
		{"0-._x", true},
		{strings.Repeat("a", 63), true},
		{"", false},
		{strings.Repeat("a", 64), false},
		{"-node", false},
		{".node", false},
		{"_node", false},
		{"node 1", false},
		{"node/1", false},
		{"node:1", false},
		{"node\x00", false},
		{"nöde", false},
		{"node\n", false},
		{"../etc", false},
	}
	for _, tt := range tests {
		err := pki.ValidNodeName(tt.name)
		if (err == nil) != tt.ok {
			t.Errorf("ValidNodeName(%q) = %v, want ok=%v", tt.name, err, tt.ok)
		}
	}
}

func TestFingerprintAndClusterID(t *testing.T) {
	ca := newCA(t)
	fp := ca.Fingerprint()
	if !isLowerHex(fp, 64) {
		t.Fatalf("Fingerprint = %q, want 64 lower-case hex digits", fp)
	}
	if ca.ClusterID() != fp[:16] || pki.ClusterID(ca.Cert) != fp[:16] {
		t.Errorf("ClusterID = %q, want %q", ca.ClusterID(), fp[:16])
	}
	if other := newCA(t); other.Fingerprint() == fp {
		t.Error("two fresh CAs have the same fingerprint")
	}
	if !ca.Cert.IsCA || ca.Cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		t.Errorf("CA certificate: IsCA=%v KeyUsage=%v; want a CA that can sign certificates", ca.Cert.IsCA, ca.Cert.KeyUsage)
	}
}

func TestSignNode(t *testing.T) {
	ca := newCA(t)
	key, err := pki.NewNodeKey()
	if err != nil {
		t.Fatal(err)
	}
	csr, err := pki.NewCSR(key, "node-1")
	if err != nil {
		t.Fatal(err)
	}
	ips := []net.IP{net.ParseIP("10.0.0.7"), net.ParseIP("fd00::7")}
	der, err := ca.SignNode(csr, "node-1", ips)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	if err := cert.CheckSignatureFrom(ca.Cert); err != nil {
		t.Errorf("node certificate not signed by the CA: %v", err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, DNSName: "node-1", KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
			t.Errorf("verify for usage %v: %v", usage, err)
		}
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: x509.NewCertPool()}); err == nil {
		t.Error("node certificate verifies without the CA in the pool")
	}
	if cert.Subject.CommonName != "node-1" {
		t.Errorf("CN = %q, want node-1", cert.Subject.CommonName)
	}
	if !slices.Equal(cert.DNSNames, []string{"node-1"}) {
		t.Errorf("DNS SANs = %v, want [node-1]", cert.DNSNames)
	}
	if len(cert.IPAddresses) != len(ips) {
		t.Fatalf("IP SANs = %v, want %v", cert.IPAddresses, ips)
	}
	for i := range ips {
		if !cert.IPAddresses[i].Equal(ips[i]) {
			t.Errorf("IP SAN %d = %v, want %v", i, cert.IPAddresses[i], ips[i])
		}
	}
	if !slices.Contains(cert.ExtKeyUsage, x509.ExtKeyUsageServerAuth) || !slices.Contains(cert.ExtKeyUsage, x509.ExtKeyUsageClientAuth) {
		t.Errorf("ExtKeyUsage = %v, want server and client auth", cert.ExtKeyUsage)
	}
	if cert.IsCA {
		t.Error("node certificate is a CA")
	}
	pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok || !pub.Equal(&key.PublicKey) {
		t.Error("node certificate is not for the CSR's key")
	}
	if !cert.NotAfter.After(time.Now().Add(pki.NodeValidity - 24*time.Hour)) {
		t.Errorf("NotAfter = %v, want about %v from now", cert.NotAfter, pki.NodeValidity)
	}
}

func TestSignNodeRefuses(t *testing.T) {
	ca := newCA(t)
	key, err := pki.NewNodeKey()
	if err != nil {
		t.Fatal(err)
	}
	csr, err := pki.NewCSR(key, "node-1")
	if err != nil {
		t.Fatal(err)
	}
	// The ECDSA signature is the last element of the CSR: changing its last
	// byte keeps the DER well-formed but breaks the signature.
	badSig := bytes.Clone(csr)
	badSig[len(badSig)-1] ^= 0x01
	if _, err := x509.ParseCertificateRequest(badSig); err != nil {
		t.Fatalf("test setup: tampered CSR no longer parses: %v", err)
	}
	badCSR, err := pki.NewCSR(key, "bad name")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		csr     []byte
		node    string
		wantErr string
	}{
		{"CN differs from the requested name", csr, "node-2", "not"},
		{"bad signature", badSig, "node-1", "signature"},
		{"garbage CSR", []byte("not a csr"), "node-1", "CSR"},
		{"empty CSR", nil, "node-1", "CSR"},
		{"invalid node name", badCSR, "bad name", "node name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			der, err := ca.SignNode(tt.csr, tt.node, nil)
			if err == nil {
				t.Fatalf("SignNode signed (%d bytes), want an error", len(der))
			}
			if der != nil {
				t.Errorf("SignNode returned a certificate with its error")
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %q does not mention %q", err, tt.wantErr)
			}
		})
	}
}

func TestPEMRoundTrip(t *testing.T) {
	ca := newCA(t)
	c, err := pki.ParseCertPEM(pki.EncodeCertPEM(ca.Cert.Raw))
	if err != nil || !c.Equal(ca.Cert) {
		t.Fatalf("ParseCertPEM(EncodeCertPEM) = %v, %v", c, err)
	}
	kp, err := pki.EncodeKeyPEM(ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	k, err := pki.ParseKeyPEM(kp)
	if err != nil {
		t.Fatal(err)
	}
	if !k.Public().(*ecdsa.PublicKey).Equal(ca.Key.Public()) {
		t.Error("key changed in the PEM round trip")
	}
	if _, err := pki.ParseCertPEM(kp); err == nil {
		t.Error("ParseCertPEM accepted a private key")
	}
	if _, err := pki.ParseKeyPEM(pki.EncodeCertPEM(ca.Cert.Raw)); err == nil {
		t.Error("ParseKeyPEM accepted a certificate")
	}
	if _, err := pki.ParseCertPEM([]byte("garbage")); err == nil {
		t.Error("ParseCertPEM accepted garbage")
	}
	if _, err := pki.ParseKeyPEM(nil); err == nil {
		t.Error("ParseKeyPEM accepted nothing")
	}
}

// --- TLS ---

func newCA(t *testing.T) *pki.CA {
	t.Helper()
	ca, err := pki.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// nodeCert issues a certificate for name from ca, with the CA appended to
// the chain as identity.TLSCertificate does.
func nodeCert(t *testing.T, ca *pki.CA, name string) tls.Certificate {
	t.Helper()
	key, err := pki.NewNodeKey()
	if err != nil {
		t.Fatal(err)
	}
	csr, err := pki.NewCSR(key, name)
	if err != nil {
		t.Fatal(err)
	}
	der, err := ca.SignNode(csr, name, []net.IP{net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der, ca.Cert.Raw}, PrivateKey: key, Leaf: leaf}
}

type result struct {
	serverErr error
	clientErr error
	server    tls.ConnectionState // valid when serverErr == nil
	client    tls.ConnectionState // valid when clientErr == nil
}

// handshake runs one TLS handshake over loopback TCP. The server writes one
// byte after a successful handshake and the client reads it, so a client
// certificate refused by the server (which a TLS 1.3 client only learns
// after its own handshake returned) shows up as a client error too.
func handshake(t *testing.T, server, client *tls.Config) result {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type srv struct {
		err   error
		state tls.ConnectionState
	}
	done := make(chan srv, 1)
	go func() {
		raw, err := ln.Accept()
		if err != nil {
			done <- srv{err: err}
			return
		}
		defer raw.Close()
		_ = raw.SetDeadline(time.Now().Add(10 * time.Second))
		tc := tls.Server(raw, server)
		if err := tc.Handshake(); err != nil {
			done <- srv{err: err}
			return
		}
		_, err = tc.Write([]byte{'k'})
		done <- srv{err: err, state: tc.ConnectionState()}
		// Wait for the client to close so the byte is not lost to a reset.
		_, _ = tc.Read(make([]byte, 1))
	}()

	var r result
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	_ = raw.SetDeadline(time.Now().Add(10 * time.Second))
	tc := tls.Client(raw, client)
	r.clientErr = tc.Handshake()
	if r.clientErr == nil {
		b := make([]byte, 1)
		if _, err := tc.Read(b); err != nil {
			r.clientErr = err
		} else if b[0] != 'k' {
			r.clientErr = errors.New("unexpected byte from server")
		}
		r.client = tc.ConnectionState()
	}
	tc.Close()
	s := <-done
	r.serverErr, r.server = s.err, s.state
	return r
}

func TestTLSMembersHandshake(t *testing.T) {
	ca := newCA(t)
	srv := pki.ServerTLS(nodeCert(t, ca, "server"), ca.Cert)
	cli := pki.ClientTLS(nodeCert(t, ca, "client"), ca.Cert)
	r := handshake(t, srv, cli)
	if r.serverErr != nil || r.clientErr != nil {
		t.Fatalf("handshake: server %v, client %v", r.serverErr, r.clientErr)
	}
	if r.server.NegotiatedProtocol != pki.ProtoControl || r.client.NegotiatedProtocol != pki.ProtoControl {
		t.Errorf("ALPN: server %q, client %q; want %q", r.server.NegotiatedProtocol, r.client.NegotiatedProtocol, pki.ProtoControl)
	}
	if r.server.Version != tls.VersionTLS13 {
		t.Errorf("TLS version %x, want TLS 1.3", r.server.Version)
	}
	if got := pki.PeerName(r.server); got != "client" {
		t.Errorf("server sees peer %q, want client", got)
	}
	if got := pki.PeerName(r.client); got != "server" {
		t.Errorf("client sees peer %q, want server", got)
	}
}

func TestTLSRefusesClientOfAnotherCA(t *testing.T) {
	ca, other := newCA(t), newCA(t)
	srv := pki.ServerTLS(nodeCert(t, ca, "server"), ca.Cert)
	// The intruder trusts our CA (it is public) but its own certificate is
	// signed by another CA.
	cli := pki.ClientTLS(nodeCert(t, other, "intruder"), ca.Cert)
	r := handshake(t, srv, cli)
	if r.serverErr == nil {
		t.Fatalf("server accepted a client certificate from another CA (peer %q)", pki.PeerName(r.server))
	}
	if r.clientErr == nil {
		t.Error("client of another CA did not see the refusal")
	}
}

func TestTLSClientRefusesServerOfAnotherCA(t *testing.T) {
	ca, other := newCA(t), newCA(t)
	srv := pki.ServerTLS(nodeCert(t, other, "impostor"), other.Cert)
	cli := pki.ClientTLS(nodeCert(t, ca, "client"), ca.Cert)
	r := handshake(t, srv, cli)
	if !errors.Is(r.clientErr, pki.ErrWrongCluster) {
		t.Fatalf("client error = %v, want ErrWrongCluster", r.clientErr)
	}
	if r.serverErr == nil {
		t.Error("server handshake succeeded although the client refused it")
	}
}

func TestTLSRefusesClientWithoutCertificate(t *testing.T) {
	ca := newCA(t)
	srv := pki.ServerTLS(nodeCert(t, ca, "server"), ca.Cert)
	cli := pki.ClientTLS(tls.Certificate{}, ca.Cert)
	cli.Certificates = nil
	r := handshake(t, srv, cli)
	if r.serverErr == nil {
		t.Fatalf("server accepted a client without certificate offering %q", pki.ProtoControl)
	}
	if r.clientErr == nil {
		t.Error("client without certificate did not see the refusal")
	}
}

func TestTLSJoin(t *testing.T) {
	ca := newCA(t)
	tok, err := pki.NewToken(ca.Cert)
	if err != nil {
		t.Fatal(err)
	}
	srv := pki.ServerTLS(nodeCert(t, ca, "server"), ca.Cert)
	r := handshake(t, srv, pki.JoinTLS(tok))
	if r.serverErr != nil || r.clientErr != nil {
		t.Fatalf("join handshake: server %v, client %v", r.serverErr, r.clientErr)
	}
	if r.server.NegotiatedProtocol != pki.ProtoJoin {
		t.Errorf("ALPN = %q, want %q", r.server.NegotiatedProtocol, pki.ProtoJoin)
	}
	if len(r.server.PeerCertificates) != 0 {
		t.Errorf("join client presented %d certificates, want none", len(r.server.PeerCertificates))
	}
}

func TestTLSJoinCannotReachControlProtocol(t *testing.T) {
	// A client without a certificate that offers the join protocol next to
	// the control protocol must only ever get the join protocol.
	ca := newCA(t)
	tok, err := pki.NewToken(ca.Cert)
	if err != nil {
		t.Fatal(err)
	}
	cli := pki.JoinTLS(tok)
	cli.NextProtos = []string{pki.ProtoControl, pki.ProtoJoin}
	r := handshake(t, pki.ServerTLS(nodeCert(t, ca, "server"), ca.Cert), cli)
	if r.serverErr != nil || r.clientErr != nil {
		t.Fatalf("handshake: server %v, client %v", r.serverErr, r.clientErr)
	}
	if r.server.NegotiatedProtocol != pki.ProtoJoin {
		t.Errorf("a client without certificate negotiated %q", r.server.NegotiatedProtocol)
	}
}

func TestTLSJoinWrongCluster(t *testing.T) {
	ca, other := newCA(t), newCA(t)
	tok, err := pki.NewToken(other.Cert)
	if err != nil {
		t.Fatal(err)
	}
	r := handshake(t, pki.ServerTLS(nodeCert(t, ca, "server"), ca.Cert), pki.JoinTLS(tok))
	if !errors.Is(r.clientErr, pki.ErrWrongCluster) {
		t.Fatalf("client error = %v, want ErrWrongCluster", r.clientErr)
	}
	if r.serverErr == nil {
		t.Error("server handshake succeeded although the client refused it")
	}
}

func TestTLSJoinRejectsImpostorCarryingTheRealCA(t *testing.T) {
	// The CA certificate is public: an impostor can append it to a chain
	// whose leaf another CA signed. The pin must not be satisfied by that.
	ca, other := newCA(t), newCA(t)
	tok, err := pki.NewToken(ca.Cert)
	if err != nil {
		t.Fatal(err)
	}
	fake := nodeCert(t, other, "server")
	fake.Certificate = [][]byte{fake.Certificate[0], ca.Cert.Raw}
	r := handshake(t, pki.ServerTLS(fake, other.Cert), pki.JoinTLS(tok))
	if !errors.Is(r.clientErr, pki.ErrWrongCluster) {
		t.Fatalf("client error = %v, want ErrWrongCluster", r.clientErr)
	}
}

func TestTLSJoinRejectsServerWithoutCAInChain(t *testing.T) {
	ca := newCA(t)
	tok, err := pki.NewToken(ca.Cert)
	if err != nil {
		t.Fatal(err)
	}
	leafOnly := nodeCert(t, ca, "server")
	leafOnly.Certificate = leafOnly.Certificate[:1]
	r := handshake(t, pki.ServerTLS(leafOnly, ca.Cert), pki.JoinTLS(tok))
	if !errors.Is(r.clientErr, pki.ErrWrongCluster) {
		t.Fatalf("client error = %v, want ErrWrongCluster (the pin needs the CA in the chain)", r.clientErr)
	}
}

func TestPeerNameWithoutCertificate(t *testing.T) {
	if got := pki.PeerName(tls.ConnectionState{}); got != "" {
		t.Errorf("PeerName of a state without certificates = %q, want empty", got)
	}
}
