package join_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/onebox-project/onebox/fabric/identity"
	"github.com/onebox-project/onebox/fabric/join"
	"github.com/onebox-project/onebox/fabric/pki"
)

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func newIdentity(t *testing.T, node string) *identity.Identity {
	t.Helper()
	id, err := identity.Init(t.TempDir(), node, []net.IP{net.ParseIP("127.0.0.1")})
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// member is a fabric port that serves only the join protocol, the way the
// agent's transport.Mux does: the TLS handshake completes before the join
// server reads a byte.
type member struct {
	addr string

	mu       sync.Mutex
	outcomes []string // "handshake", "protocol" or the Result code
}

func (m *member) record(s string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.outcomes = append(m.outcomes, s)
}

// waitOutcomes waits until n connections were handled and returns their outcomes.
func (m *member) waitOutcomes(t *testing.T, n int) []string {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		m.mu.Lock()
		out := slices.Clone(m.outcomes)
		m.mu.Unlock()
		if len(out) >= n {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 5s the member handled %d connections (%v), want %d", len(out), out, n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// startMember listens on loopback with id's fabric TLS configuration and
// serves each join connection with srv (Identity and Logger filled in).
func startMember(t *testing.T, id *identity.Identity, srv *join.Server) *member {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", id.ServerTLS())
	if err != nil {
		t.Fatal(err)
	}
	m := &member{addr: ln.Addr().String()}
	srv.Identity = id
	srv.Logger = quietLogger()
	prev := srv.Result
	srv.Result = func(code string) {
		if prev != nil {
			prev(code)
		}
		m.record(code)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				tc := c.(*tls.Conn)
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				if err := tc.HandshakeContext(ctx); err != nil {
					m.record("handshake")
					tc.Close()
					return
				}
				if tc.ConnectionState().NegotiatedProtocol != pki.ProtoJoin {
					m.record("protocol")
					tc.Close()
					return
				}
				srv.ServeConn(tc)
			}()
		}
	}()
	return m
}

func TestJoinAdmitsNode(t *testing.T) {
	id := newIdentity(t, "n1")
	var asked []string
	var mu sync.Mutex
	m := startMember(t, id, &join.Server{
		NameTaken: func(node string) (string, bool) {
			mu.Lock()
			defer mu.Unlock()
			asked = append(asked, node)
			return "", false
		},
		Peers: func() []string { return []string{"127.0.0.1:7946", "127.0.0.2:7946"} },
	})

	ips := []net.IP{net.ParseIP("127.0.0.2"), net.ParseIP("fd00::2")}
	got, peers, err := join.Dial(context.Background(), m.addr, id.Token, "n2", ips)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	if out := m.waitOutcomes(t, 1); !slices.Equal(out, []string{"ok"}) {
		t.Errorf("server outcomes %v, want [ok]", out)
	}
	mu.Lock()
	if !slices.Equal(asked, []string{"n2"}) {
		t.Errorf("NameTaken asked for %v, want [n2]", asked)
	}
	mu.Unlock()
	if !slices.Equal(peers, []string{"127.0.0.1:7946", "127.0.0.2:7946"}) {
		t.Errorf("peers = %v", peers)
	}

	roots := x509.NewCertPool()
	roots.AddCert(id.CACert)
	if _, err := got.NodeCert.Verify(x509.VerifyOptions{Roots: roots, DNSName: "n2", KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("new node certificate does not verify against the cluster CA: %v", err)
	}
	pub, ok := got.NodeCert.PublicKey.(*ecdsa.PublicKey)
	if !ok || !pub.Equal(got.NodeKey.Public()) {
		t.Error("NodeKey does not match NodeCert")
	}
	if got.NodeCert.Subject.CommonName != "n2" || got.Node != "n2" {
		t.Errorf("node = %q, certificate CN = %q; want n2", got.Node, got.NodeCert.Subject.CommonName)
	}
	if len(got.NodeCert.IPAddresses) != 2 || !got.NodeCert.IPAddresses[0].Equal(ips[0]) || !got.NodeCert.IPAddresses[1].Equal(ips[1]) {
		t.Errorf("IP SANs = %v, want %v", got.NodeCert.IPAddresses, ips)
	}
	if got.ClusterID != id.ClusterID || !got.CACert.Equal(id.CACert) || got.Token != id.Token || !bytes.Equal(got.GossipKey, id.GossipKey) {
		t.Error("joined identity does not carry the cluster's CA, token and gossip key")
	}
	if !got.CAKey.Public().(*ecdsa.PublicKey).Equal(id.CAKey.Public()) {
		t.Error("joined identity does not carry the cluster's CA key")
	}

	// The identity is complete: it saves, loads, and is a member for TLS.
	dir := t.TempDir()
	if err := got.Save(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := identity.Load(dir); err != nil {
		t.Fatalf("Load of the joined identity: %v", err)
	}
}

func TestJoinWrongSecret(t *testing.T) {
	id := newIdentity(t, "n1")
	var nameAsked atomic.Bool
	m := startMember(t, id, &join.Server{NameTaken: func(string) (string, bool) { nameAsked.Store(true); return "", false }})
	tok := id.Token
	tok.Secret = strings.Repeat("0", 32)
	if tok.Secret == id.Token.Secret {
		t.Skip("the random secret is all zeros")
	}
	_, _, err := join.Dial(context.Background(), m.addr, tok, "n2", nil)
	var re *join.RefusedError
	if !errors.As(err, &re) {
		t.Fatalf("Dial error = %v (%T), want *join.RefusedError", err, err)
	}
	if re.Code != join.CodeBadToken {
		t.Errorf("Code = %q, want %q", re.Code, join.CodeBadToken)
	}
	if re.Addr != m.addr || !strings.Contains(err.Error(), "check the token") {
		t.Errorf("error %q lacks the address or the hint", err)
	}
	if out := m.waitOutcomes(t, 1); !slices.Equal(out, []string{join.CodeBadToken}) {
		t.Errorf("server outcomes %v", out)
	}
	if nameAsked.Load() {
		t.Error("NameTaken was asked before the secret was checked")
	}
}

func TestJoinNameTaken(t *testing.T) {
	id := newIdentity(t, "n1")
	m := startMember(t, id, &join.Server{NameTaken: func(node string) (string, bool) {
		return "10.9.9.9:7947", node == "n2"
	}})
	_, _, err := join.Dial(context.Background(), m.addr, id.Token, "n2", nil)
	var re *join.RefusedError
	if !errors.As(err, &re) || re.Code != join.CodeNameTaken {
		t.Fatalf("Dial error = %v, want a refusal with code %s", err, join.CodeNameTaken)
	}
	if !strings.Contains(re.Reason, "10.9.9.9:7947") {
		t.Errorf("reason %q does not say who holds the name", re.Reason)
	}
	// Another name is fine.
	if _, _, err := join.Dial(context.Background(), m.addr, id.Token, "n3", nil); err != nil {
		t.Errorf("Dial as n3: %v", err)
	}
	if out := m.waitOutcomes(t, 2); !slices.Equal(out, []string{join.CodeNameTaken, "ok"}) {
		t.Errorf("server outcomes %v", out)
	}
}

func TestJoinBadNodeName(t *testing.T) {
	id := newIdentity(t, "n1")
	m := startMember(t, id, &join.Server{})
	_, _, err := join.Dial(context.Background(), m.addr, id.Token, "bad name", nil)
	var re *join.RefusedError
	if !errors.As(err, &re) || re.Code != join.CodeBadRequest {
		t.Fatalf("Dial error = %v, want a refusal with code %s", err, join.CodeBadRequest)
	}
}

func TestJoinTokenOfAnotherClusterFailsBeforeSendingTheSecret(t *testing.T) {
	id := newIdentity(t, "n1")
	other := newIdentity(t, "x1")
	m := startMember(t, id, &join.Server{})
	_, _, err := join.Dial(context.Background(), m.addr, other.Token, "n2", nil)
	if err == nil {
		t.Fatal("Dial with another cluster's token succeeded")
	}
	var re *join.RefusedError
	if errors.As(err, &re) {
		t.Fatalf("the member refused a request (%v): the secret was sent to a member of another cluster", err)
	}
	if !strings.Contains(err.Error(), "another cluster") || !strings.Contains(err.Error(), other.Token.ClusterID()) {
		t.Errorf("error %q does not explain the cluster mismatch", err)
	}
	if out := m.waitOutcomes(t, 1); !slices.Equal(out, []string{"handshake"}) {
		t.Errorf("server outcomes %v, want only a failed handshake", out)
	}
}

func TestJoinUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	id := newIdentity(t, "n1")
	_, _, err = join.Dial(context.Background(), addr, id.Token, "n2", nil)
	if err == nil || !strings.Contains(err.Error(), addr) {
		t.Fatalf("Dial to a closed port = %v, want an error naming %s", err, addr)
	}
}

// joinConn dials a member with the join protocol, as a hand-written client.
func joinConn(t *testing.T, addr string, tok pki.Token) *tls.Conn {
	t.Helper()
	c, err := tls.Dial("tcp", addr, pki.JoinTLS(tok))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	return c
}

func readResponse(t *testing.T, c net.Conn) join.Response {
	t.Helper()
	b, err := join.ReadFrame(c)
	if err != nil {
		t.Fatal(err)
	}
	var resp join.Response
	if err := json.Unmarshal(b, &resp); err != nil {
		t.Fatal(err)
	}
	return resp
}

func TestJoinServerRefusesMalformedRequests(t *testing.T) {
	id := newIdentity(t, "n1")
	m := startMember(t, id, &join.Server{})
	key, err := pki.NewNodeKey()
	if err != nil {
		t.Fatal(err)
	}
	csrN3, err := pki.NewCSR(key, "n3")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		send func(c net.Conn) error
	}{
		{"4 GiB header", func(c net.Conn) error { _, err := c.Write([]byte{0xff, 0xff, 0xff, 0xff}); return err }},
		{"garbage JSON", func(c net.Conn) error { _, err := c.Write(frame(3, []byte("{{{"))); return err }},
		{"CSR for another name", func(c net.Conn) error {
			return join.WriteFrame(c, join.Request{Version: join.Version, Node: "n2", Secret: id.Token.Secret, CSR: csrN3})
		}},
		{"CSR that is not one", func(c net.Conn) error {
			return join.WriteFrame(c, join.Request{Version: join.Version, Node: "n2", Secret: id.Token.Secret, CSR: []byte("junk")})
		}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := joinConn(t, m.addr, id.Token)
			if err := tt.send(c); err != nil {
				t.Fatal(err)
			}
			resp := readResponse(t, c)
			if resp.Code != join.CodeBadRequest || resp.Error == "" {
				t.Errorf("response code %q error %q, want %s", resp.Code, resp.Error, join.CodeBadRequest)
			}
			if resp.Cert != nil || resp.CAKey != nil || resp.GossipKey != nil || resp.Token != "" {
				t.Error("a refusal carries cluster secrets")
			}
			if out := m.waitOutcomes(t, i+1); out[i] != join.CodeBadRequest {
				t.Errorf("server outcome %q", out[i])
			}
		})
	}
}

// fakeMember answers every join request on a listener that has the real
// cluster's TLS identity (so the pin passes) with whatever answer returns.
func fakeMember(t *testing.T, id *identity.Identity, answer func(req join.Request) any) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", id.ServerTLS())
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { ln.Close(); <-done })
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			if b, err := join.ReadFrame(c); err == nil {
				var req join.Request
				_ = json.Unmarshal(b, &req)
				switch a := answer(req).(type) {
				case []byte: // raw bytes on the wire
					_, _ = c.Write(a)
				default:
					_ = join.WriteFrame(c, a)
				}
			}
			c.Close()
		}
	}()
	return ln.Addr().String()
}

func TestDialRejectsBadResponses(t *testing.T) {
	id := newIdentity(t, "n1")
	other := newIdentity(t, "x1")
	caKey, err := pki.EncodeKeyPEM(id.CAKey)
	if err != nil {
		t.Fatal(err)
	}
	// good signs the request as a real member would; tests then spoil one field.
	good := func(req join.Request) join.Response {
		csr, err := x509.ParseCertificateRequest(req.CSR)
		if err != nil {
			t.Error(err)
			return join.Response{}
		}
		der, err := id.CA().SignNode(req.CSR, csr.Subject.CommonName, nil)
		if err != nil {
			t.Error(err)
		}
		return join.Response{Cert: der, CACert: id.CACert.Raw, CAKey: caKey, GossipKey: id.GossipKey, Token: id.Token.String()}
	}
	signFor := func(node string) []byte {
		k, _ := pki.NewNodeKey()
		csr, _ := pki.NewCSR(k, node)
		der, err := id.CA().SignNode(csr, node, nil)
		if err != nil {
			t.Fatal(err)
		}
		return der
	}
	tests := []struct {
		name    string
		answer  func(req join.Request) any
		errText string
		isWrong bool // errors.Is(err, pki.ErrWrongCluster)
	}{
		{"sanity: good answer", func(r join.Request) any { return good(r) }, "", false},
		{"certificate for another key", func(r join.Request) any {
			resp := good(r)
			resp.Cert = signFor("n2")
			return resp
		}, "not for our key", false},
		{"CA of another cluster", func(r join.Request) any {
			resp := good(r)
			resp.CACert = other.CACert.Raw
			return resp
		}, "", true},
		{"certificate signed by another CA", func(r join.Request) any {
			resp := good(r)
			der, err := other.CA().SignNode(r.CSR, r.Node, nil)
			if err != nil {
				t.Error(err)
			}
			resp.Cert = der
			return resp
		}, "not signed", false},
		{"short gossip key", func(r join.Request) any {
			resp := good(r)
			resp.GossipKey = resp.GossipKey[:16]
			return resp
		}, "gossip key", false},
		{"bad token", func(r join.Request) any {
			resp := good(r)
			resp.Token = "obx1.zz"
			return resp
		}, "token", false},
		{"no CA key", func(r join.Request) any {
			resp := good(r)
			resp.CAKey = nil
			return resp
		}, "key", false},
		{"malformed JSON", func(join.Request) any { return frame(2, []byte("{x")) }, "malformed", false},
		{"oversized frame", func(join.Request) any { return []byte{0xff, 0xff, 0xff, 0xff} }, "out of range", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			addr := fakeMember(t, id, tt.answer)
			got, _, err := join.Dial(context.Background(), addr, id.Token, "n2", nil)
			if tt.errText == "" && !tt.isWrong {
				if err != nil {
					t.Fatalf("Dial: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Dial accepted the answer: identity for %q", got.Node)
			}
			if tt.isWrong && !errors.Is(err, pki.ErrWrongCluster) {
				t.Errorf("error %v is not ErrWrongCluster", err)
			}
			if !strings.Contains(err.Error(), tt.errText) {
				t.Errorf("error %q does not mention %q", err, tt.errText)
			}
		})
	}
}
