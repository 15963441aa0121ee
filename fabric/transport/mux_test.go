package transport_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/onebox-project/onebox/fabric/identity"
	"github.com/onebox-project/onebox/fabric/pki"
	"github.com/onebox-project/onebox/fabric/transport"
)

var (
	idOnce        sync.Once
	member, alien *identity.Identity
	idErr         error
)

// identities returns a member identity and one of another cluster, made
// once for the whole package (key generation is the slow part).
func identities(t *testing.T) (*identity.Identity, *identity.Identity) {
	t.Helper()
	idOnce.Do(func() {
		var dir1, dir2 string
		if dir1, idErr = os.MkdirTemp("", "mux-test"); idErr != nil {
			return
		}
		defer os.RemoveAll(dir1)
		if dir2, idErr = os.MkdirTemp("", "mux-test"); idErr != nil {
			return
		}
		defer os.RemoveAll(dir2)
		if member, idErr = identity.Init(dir1, "n1", []net.IP{net.ParseIP("127.0.0.1")}); idErr != nil {
			return
		}
		alien, idErr = identity.Init(dir2, "x1", nil)
	})
	if idErr != nil {
		t.Fatal(idErr)
	}
	return member, alien
}

type fixture struct {
	mux  *transport.Mux
	addr string

	mu    sync.Mutex
	fails []string

	serveErr chan error
}

func (f *fixture) failures() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.fails)
}

// waitFailures waits until onFail was called n times and returns the reasons.
func (f *fixture) waitFailures(t *testing.T, n int, within time.Duration) []string {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		got := f.failures()
		if len(got) >= n {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v onFail was called %d times (%v), want %d", within, len(got), got, n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// startMux serves a Mux for id on loopback; "http/1.1" connections get "ok".
func startMux(t *testing.T, id *identity.Identity) *fixture {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{addr: ln.Addr().String(), serveErr: make(chan error, 1)}
	f.mux = transport.NewMux(ln, id.ServerTLS(), slog.New(slog.NewTextHandler(io.Discard, nil)), func(reason string) {
		f.mu.Lock()
		defer f.mu.Unlock()
		f.fails = append(f.fails, reason)
	})
	f.mux.Handle(pki.ProtoControl, func(c net.Conn) {
		defer c.Close()
		_, _ = c.Write([]byte("ok"))
	})
	go func() { f.serveErr <- f.mux.Serve(context.Background()) }()
	t.Cleanup(func() {
		f.mux.Close()
		<-f.serveErr
	})
	return f
}

// readAll reads c to its end with a deadline and reports what came and how
// the connection ended.
func readAll(c net.Conn, within time.Duration) ([]byte, error) {
	_ = c.SetReadDeadline(time.Now().Add(within))
	return io.ReadAll(c)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func TestMemberGetsHandler(t *testing.T) {
	id, _ := identities(t)
	f := startMux(t, id)
	c, err := tls.Dial("tcp", f.addr, id.ClientTLS())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got, err := readAll(c, 5*time.Second)
	if err != nil || string(got) != "ok" {
		t.Fatalf("read %q, %v; want ok", got, err)
	}
	if fails := f.failures(); len(fails) != 0 {
		t.Errorf("onFail called for a member: %v", fails)
	}
	if f.mux.Addr().String() != f.addr {
		t.Errorf("Addr = %v, want %s", f.mux.Addr(), f.addr)
	}
}

func TestGarbageIsDropped(t *testing.T) {
	rnd := make([]byte, 512)
	r := rand.New(rand.NewChaCha8([32]byte{1}))
	for i := range rnd {
		rnd[i] = byte(r.Uint32())
	}
	tests := []struct {
		name string
		data []byte
	}{
		{"plain HTTP", []byte("GET / HTTP/1.0\r\n\r\n")},
		{"random bytes", rnd},
		{"TLS record header then garbage", append([]byte{0x16, 0x03, 0x01, 0x00, 0x05}, "hello"...)},
	}
	id, _ := identities(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := startMux(t, id)
			c, err := net.Dial("tcp", f.addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := c.Write(tt.data); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			got, err := readAll(c, transport.HandshakeTimeout+time.Second)
			if isTimeout(err) {
				t.Fatalf("connection still open after %v", time.Since(start))
			}
			if string(got) == "ok" {
				t.Fatal("garbage reached the handler")
			}
			if fails := f.waitFailures(t, 1, time.Second); !slices.Equal(fails, []string{"handshake"}) {
				t.Errorf("onFail reasons %v, want [handshake]", fails)
			}
		})
	}
}

func TestSilentClientIsDropped(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for the handshake timeout")
	}
	id, _ := identities(t)
	f := startMux(t, id)
	c, err := net.Dial("tcp", f.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	_, err = readAll(c, transport.HandshakeTimeout+time.Second)
	elapsed := time.Since(start)
	if isTimeout(err) {
		t.Fatalf("silent connection still open after %v", elapsed)
	}
	if elapsed < transport.HandshakeTimeout-500*time.Millisecond {
		t.Errorf("silent connection dropped after %v, before the handshake timeout %v", elapsed, transport.HandshakeTimeout)
	}
	if fails := f.waitFailures(t, 1, time.Second); !slices.Equal(fails, []string{"handshake"}) {
		t.Errorf("onFail reasons %v, want [handshake]", fails)
	}
}

func TestNonMembersAreRejected(t *testing.T) {
	id, other := identities(t)
	noCert := id.ClientTLS()
	noCert.Certificates = nil
	alienCert := other.ClientTLS()
	alienCert.VerifyPeerCertificate = nil // the intruder trusts anybody; our server must not
	wrongToken := other.Token
	tests := []struct {
		name   string
		cfg    *tls.Config
		reason string // onFail
	}{
		{"no certificate", noCert, "no_certificate"},
		{"certificate of another cluster", alienCert, "bad_certificate"},
		// A member of another cluster refuses our certificate first.
		{"member of another cluster", other.ClientTLS(), "bad_certificate"},
		{"join token of another cluster", pki.JoinTLS(wrongToken), "bad_certificate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := startMux(t, id)
			c, err := tls.Dial("tcp", f.addr, tt.cfg)
			if err == nil {
				// TLS 1.3: the client learns of the refusal on its first read.
				var got []byte
				got, err = readAll(c, 5*time.Second)
				c.Close()
				if len(got) != 0 {
					t.Fatalf("a non-member read %q", got)
				}
			}
			if err == nil || isTimeout(err) {
				t.Errorf("client error = %v, want a refusal", err)
			}
			if fails := f.waitFailures(t, 1, 5*time.Second); !slices.Equal(fails, []string{tt.reason}) {
				t.Errorf("onFail reasons %v, want [%s]", fails, tt.reason)
			}
		})
	}
}

func TestJoinProtocolRouting(t *testing.T) {
	id, _ := identities(t)

	t.Run("no join handler", func(t *testing.T) {
		f := startMux(t, id)
		c, err := tls.Dial("tcp", f.addr, pki.JoinTLS(id.Token))
		if err != nil {
			t.Fatal(err)
		}
		got, _ := readAll(c, 5*time.Second)
		c.Close()
		if len(got) != 0 {
			t.Errorf("join client without a join handler read %q", got)
		}
		if fails := f.waitFailures(t, 1, 5*time.Second); !slices.Equal(fails, []string{"no_protocol"}) {
			t.Errorf("onFail reasons %v, want [no_protocol]", fails)
		}
	})

	t.Run("join handler", func(t *testing.T) {
		f := startMux(t, id)
		f.mux.Handle(pki.ProtoJoin, func(c net.Conn) {
			defer c.Close()
			_, _ = c.Write([]byte("join"))
		})
		c, err := tls.Dial("tcp", f.addr, pki.JoinTLS(id.Token))
		if err != nil {
			t.Fatal(err)
		}
		got, err := readAll(c, 5*time.Second)
		c.Close()
		if err != nil || string(got) != "join" {
			t.Errorf("join client read %q, %v; want join", got, err)
		}
		if fails := f.failures(); len(fails) != 0 {
			t.Errorf("onFail reasons %v, want none", fails)
		}
	})
}

func TestListenerServesHTTP(t *testing.T) {
	id, _ := identities(t)
	f := startMux(t, id)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "peer "+pki.PeerName(*r.TLS))
	})}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(f.mux.Listener(pki.ProtoControl)) }()
	defer func() {
		_ = srv.Close()
		if err := <-done; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("Serve = %v", err)
		}
	}()

	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: id.ClientTLS()}, Timeout: 5 * time.Second}
	defer hc.CloseIdleConnections()
	resp, err := hc.Get("https://" + f.addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "peer n1" {
		t.Errorf("body %q, want %q", body, "peer n1")
	}
}

// dialFrom opens a TCP connection to addr from a chosen loopback source.
func dialFrom(t *testing.T, src, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// One source holding idle connections is cut off at MaxPendingPerSource
// and cannot lock out members from elsewhere; all sources together are cut
// off at MaxPending.
func TestBusy(t *testing.T) {
	id, _ := identities(t)
	f := startMux(t, id)
	var silent []net.Conn
	defer func() {
		for _, c := range silent {
			c.Close()
		}
	}()
	for range transport.MaxPendingPerSource {
		silent = append(silent, dialFrom(t, "127.0.0.1", f.addr))
	}
	c := dialFrom(t, "127.0.0.1", f.addr)
	_, err := readAll(c, 3*time.Second)
	c.Close()
	if isTimeout(err) {
		t.Fatal("connection beyond MaxPendingPerSource was not closed at once")
	}
	if fails := f.waitFailures(t, 1, time.Second); !slices.Equal(fails, []string{"busy"}) {
		t.Errorf("onFail reasons %v, want [busy]", fails)
	}
	// A member from another address still gets through.
	d := tls.Dialer{NetDialer: &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}}, Config: id.ClientTLS()}
	mc, err := d.Dial("tcp", f.addr)
	if err != nil {
		t.Fatalf("member locked out by another source's idle connections: %v", err)
	}
	got, _ := readAll(mc, 5*time.Second)
	mc.Close()
	if string(got) != "ok" {
		t.Errorf("member read %q", got)
	}

	// Fill the global limit from many sources.
	for i := 0; len(silent) < transport.MaxPending; i++ {
		src := fmt.Sprintf("127.0.1.%d", 1+i/transport.MaxPendingPerSource)
		silent = append(silent, dialFrom(t, src, f.addr))
	}
	time.Sleep(100 * time.Millisecond) // let the accept loop take them all
	c = dialFrom(t, "127.0.2.1", f.addr)
	_, err = readAll(c, 3*time.Second)
	c.Close()
	if isTimeout(err) {
		t.Fatal("connection beyond MaxPending was not closed at once")
	}
	for _, c := range silent {
		c.Close()
	}
	silent = nil
	// Once the half-open connections are gone, members get through again.
	f.waitFailures(t, 2+transport.MaxPending, 5*time.Second)
	mc, err = tls.Dial("tcp", f.addr, id.ClientTLS())
	if err != nil {
		t.Fatal(err)
	}
	got, err = readAll(mc, 5*time.Second)
	mc.Close()
	if string(got) != "ok" {
		t.Errorf("member after the flood read %q, %v", got, err)
	}
}

func TestCloseStopsServe(t *testing.T) {
	id, _ := identities(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := transport.NewMux(ln, id.ServerTLS(), slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	done := make(chan error, 1)
	go func() { done <- m.Serve(context.Background()) }()
	// One member connection served before Close.
	c, err := tls.Dial("tcp", ln.Addr().String(), id.ClientTLS())
	if err != nil {
		t.Fatal(err)
	}
	c.Close()

	closed := make(chan error, 1)
	go func() { closed <- m.Close() }()
	select {
	case <-closed:
	case <-time.After(2 * time.Second):
		t.Fatal("Close did not return")
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve = %v, want nil after Close", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Serve did not return after Close")
	}
	if _, err := net.DialTimeout("tcp", ln.Addr().String(), time.Second); err == nil {
		t.Error("the port still accepts connections after Close")
	}
}

func TestContextStopsServe(t *testing.T) {
	id, _ := identities(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := transport.NewMux(ln, id.ServerTLS(), slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Serve(ctx) }()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve = %v, want nil after cancel", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Serve did not return after its context was cancelled")
	}
	_ = m.Close()
}

func TestCloseDoesNotWaitForLongHandlers(t *testing.T) {
	id, _ := identities(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := transport.NewMux(ln, id.ServerTLS(), slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	release := make(chan struct{})
	entered := make(chan struct{})
	m.Handle(pki.ProtoControl, func(c net.Conn) {
		defer c.Close()
		close(entered)
		<-release
	})
	done := make(chan error, 1)
	go func() { done <- m.Serve(context.Background()) }()
	c, err := tls.Dial("tcp", ln.Addr().String(), id.ClientTLS())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	select {
	case <-entered:
	case <-time.After(5 * time.Second):
		t.Fatal("handler not called")
	}
	closed := make(chan error, 1)
	go func() { closed <- m.Close() }()
	select {
	case <-closed:
	case <-time.After(2 * time.Second):
		t.Error("Close is still waiting for a running handler after 2s")
		close(release)
		<-closed
		<-done
		return
	}
	close(release)
	<-done
}
