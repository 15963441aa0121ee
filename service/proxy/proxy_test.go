package proxy

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/onebox-project/onebox/service/balance"
	"github.com/onebox-project/onebox/service/wire"
)

// echoServer answers each line with "name: line".
func echoServer(t *testing.T, name string) (port int, stop func()) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					io.WriteString(c, name+": "+sc.Text()+"\n")
				}
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port, func() { ln.Close() }
}

func deadPort(t *testing.T) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	return p
}

// backend serves a Backend on a local TCP listener (the fabric's TLS
// is the agent's business) that connects to 127.0.0.1.
func backend(t *testing.T) (addr string, b *Backend) {
	addr, b, _ = backendConns(t)
	return addr, b
}

// backendConns is backend, with a function that returns the fabric
// connections accepted so far.
func backendConns(t *testing.T) (addr string, b *Backend, conns func() []net.Conn) {
	t.Helper()
	var mu sync.Mutex
	var accepted []net.Conn
	b = &Backend{Log: slog.Default(), Local: func(ctx context.Context, req wire.Request) (net.Conn, wire.Reply) {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(req.Port))))
		if err != nil {
			return nil, wire.Reply{Status: wire.StatusRefused, Message: err.Error()}
		}
		return c, wire.Reply{}
	}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			accepted = append(accepted, c)
			mu.Unlock()
			go b.ServeConn(c, "peer")
		}
	}()
	t.Cleanup(func() { ln.Close(); b.Close() })
	return ln.Addr().String(), b, func() []net.Conn {
		mu.Lock()
		defer mu.Unlock()
		return append([]net.Conn(nil), accepted...)
	}
}

// sessions opens streams to the backend at baddr (any key).
func sessions(t *testing.T, baddr string) *Sessions {
	s := &Sessions{Dial: func(ctx context.Context, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", baddr)
	}}
	t.Cleanup(func() { s.Close() })
	return s
}

// frontend serves pool keys "PORT" through the backend at baddr.
func frontend(t *testing.T, baddr string, policy balance.Policy, ports ...int) (string, *Frontend) {
	t.Helper()
	f := newFrontend(t, baddr, policy, ports...)
	return serve(t, f), f
}

// echoThroughSession serves one echo target ("a") through a frontend
// whose backend reports its fabric connections (conns), until the test
// ends; addr is the frontend's client port.
func echoThroughSession(t *testing.T) (f *Frontend, addr string, conns func() []net.Conn) {
	t.Helper()
	pa, stop := echoServer(t, "a")
	t.Cleanup(stop)
	baddr, _, conns := backendConns(t)
	f = newFrontend(t, baddr, balance.RoundRobin, pa)
	return f, serve(t, f), conns
}

func newFrontend(t *testing.T, baddr string, policy balance.Policy, ports ...int) *Frontend {
	var keys []string
	for _, p := range ports {
		keys = append(keys, strconv.Itoa(p))
	}
	ss := sessions(t, baddr)
	f := &Frontend{
		Pool: balance.NewPool(policy, balance.Thresholds{}, keys...),
		Dial: func(ctx context.Context, key string) (net.Conn, error) {
			port, _ := strconv.Atoi(key)
			return ss.Open(ctx, "backend", wire.Request{Kind: wire.KindConnect, Port: uint16(port)})
		},
		DialTimeout: 2 * time.Second,
	}
	return f
}

func serve(t *testing.T, f *Frontend) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go f.Serve(ln)
	t.Cleanup(func() { f.Close() })
	return ln.Addr().String()
}

func ask(t *testing.T, addr, line string) (string, error) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, line+"\n"); err != nil {
		return "", err
	}
	s, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(s), err
}

func TestFrontendBalancesAndSkipsDead(t *testing.T) {
	pa, stopA := echoServer(t, "a")
	defer stopA()
	pb, stopB := echoServer(t, "b")
	defer stopB()
	dead := deadPort(t)
	baddr, _ := backend(t)
	addr, f := frontend(t, baddr, balance.RoundRobin, pa, dead, pb)
	seen := map[string]int{}
	for i := range 10 {
		got, err := ask(t, addr, "hi"+strconv.Itoa(i))
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		name, rest, _ := strings.Cut(got, ": ")
		if rest != "hi"+strconv.Itoa(i) {
			t.Fatalf("request %d: answer %q", i, got)
		}
		seen[name]++
	}
	if seen["a"] < 4 || seen["b"] < 4 {
		t.Errorf("connections spread %v, want both targets used", seen)
	}
	// The handlers end just after the clients hang up.
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		active := int64(0)
		for _, s := range f.Pool.States() {
			active += s.Active
		}
		if active == 0 {
			break
		}
	}
	for _, s := range f.Pool.States() {
		if s.Key == strconv.Itoa(dead) && (s.Healthy || s.Failed != 1) {
			t.Errorf("dead target %+v: want out after one failed dial", s)
		}
		if s.Active != 0 {
			t.Errorf("%+v: connections still counted active", s)
		}
	}
}

// With every target down a client is closed promptly, not left hanging.
func TestFrontendAllDown(t *testing.T) {
	baddr, _ := backend(t)
	addr, _ := frontend(t, baddr, balance.LeastConn, deadPort(t), deadPort(t))
	got, err := ask(t, addr, "x")
	if err == nil {
		t.Fatalf("answer %q with every target down", got)
	}
	// Closed by the frontend, not left until the client's own deadline.
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatalf("client left hanging: %v", err)
	}
}

func TestBackendCheckAndBadHeader(t *testing.T) {
	pa, stop := echoServer(t, "a")
	defer stop()
	baddr, _ := backend(t)
	ss := sessions(t, baddr)
	check := func(port int) error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		c, err := ss.Open(ctx, "backend", wire.Request{Kind: wire.KindCheck, Port: uint16(port)})
		if c != nil {
			c.Close()
		}
		return err
	}
	if err := check(pa); err != nil {
		t.Errorf("check of a live port: %v", err)
	}
	var re *wire.ReplyError
	if err := check(deadPort(t)); !errors.As(err, &re) || re.Reply.Status != wire.StatusRefused {
		t.Errorf("check of a dead port: %v", err)
	}
	c, _ := net.Dial("tcp", baddr)
	defer c.Close()
	io.WriteString(c, "GET / HTTP/1.1\r\n\r\n")
	c.SetDeadline(time.Now().Add(5 * time.Second))
	rep, err := wire.ReadReply(c)
	if err != nil || rep.Status != wire.StatusBad {
		t.Errorf("garbage header: reply %+v, %v", rep, err)
	}
	// A version 1 client (a header per connection, no session) is told.
	c1, _ := net.Dial("tcp", baddr)
	defer c1.Close()
	c1.Write([]byte{'O', 'B', 'S', 'V', 1, byte(wire.KindConnect), 0x1f, 0x40, 0})
	c1.SetDeadline(time.Now().Add(5 * time.Second))
	rep, err = wire.ReadReply(c1)
	if err != nil || rep.Status != wire.StatusBad || !strings.Contains(rep.Message, "version 1") {
		t.Errorf("version 1 header: reply %+v, %v", rep, err)
	}
	// A connect request without a session first is refused too.
	c2, _ := net.Dial("tcp", baddr)
	defer c2.Close()
	b, _ := wire.AppendRequest(nil, wire.Request{Kind: wire.KindConnect, Port: uint16(pa)})
	c2.Write(b)
	c2.SetDeadline(time.Now().Add(5 * time.Second))
	rep, err = wire.ReadReply(c2)
	if err != nil || rep.Status != wire.StatusBad {
		t.Errorf("connect outside a session: reply %+v, %v", rep, err)
	}
}

// Splice half-closes: a client that sends a request and shuts its write
// side still gets the whole answer.
func TestSpliceHalfClose(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		b, _ := io.ReadAll(c) // until the client's half-close
		io.WriteString(c, strings.ToUpper(string(b)))
		c.Close()
	}()
	front, _ := net.Listen("tcp", "127.0.0.1:0")
	defer front.Close()
	go func() {
		c, err := front.Accept()
		if err != nil {
			return
		}
		up, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			c.Close()
			return
		}
		Splice(c, up)
	}()
	c, _ := net.Dial("tcp", front.Addr().String())
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, "hello")
	c.(*net.TCPConn).CloseWrite()
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "HELLO" {
		t.Fatalf("got %q, %v", b, err)
	}
}

// A target whose dial never answers (a node whose packets are dropped)
// delays a client by HedgeAfter, not DialTimeout, and is taken out when
// its dial times out.
func TestFrontendHedgesSilentTarget(t *testing.T) {
	pa, stop := echoServer(t, "a")
	defer stop()
	baddr, _ := backend(t)
	f := newFrontend(t, baddr, balance.RoundRobin, pa)
	live := f.Dial
	f.Pool.SetTargets([]string{"silent", strconv.Itoa(pa)})
	f.HedgeAfter = 200 * time.Millisecond
	var silentEnded atomic.Bool
	f.Dial = func(ctx context.Context, key string) (net.Conn, error) {
		if key == "silent" {
			<-ctx.Done()
			silentEnded.Store(true)
			return nil, ctx.Err()
		}
		return live(ctx, key)
	}
	addr := serve(t, f)
	got, err := ask(t, addr, "x")
	if err != nil || got != "a: x" {
		t.Fatalf("answer %q, %v", got, err)
	}
	// Served while the silent target's dial still waited: the hedge, not
	// the dial's end, let the client through (no clock in the verdict).
	if silentEnded.Load() {
		t.Errorf("served only after the silent target's dial ended: it was waited for")
	}
	deadline := time.Now().Add(20 * time.Second) // a hang bound
	for {
		st := f.Pool.States()[0]
		if !st.Healthy && st.Active == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("silent target not taken out: %+v", st)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Beyond MaxConns a client is closed at once, and served again once
// connections end.
func TestFrontendMaxConns(t *testing.T) {
	pa, stop := echoServer(t, "a")
	defer stop()
	baddr, _ := backend(t)
	f := newFrontend(t, baddr, balance.RoundRobin, pa)
	f.MaxConns = 1
	busy := make(chan string, 4)
	f.OnDone = func(key string, _, _ int64) {
		if key == Busy {
			busy <- key
		}
	}
	addr := serve(t, f)
	held, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	held.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(held, "first\n")
	if s, err := bufio.NewReader(held).ReadString('\n'); err != nil || s != "a: first\n" {
		t.Fatalf("first connection: %q %v", s, err)
	}
	if got, err := ask(t, addr, "second"); err == nil {
		t.Fatalf("second connection served past MaxConns: %q", got)
	}
	select {
	case <-busy:
	case <-time.After(5 * time.Second):
		t.Fatal("refusal not reported")
	}
	held.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got, err := ask(t, addr, "third")
		if err == nil && got == "a: third" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not served after the first connection ended: %q %v", got, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
