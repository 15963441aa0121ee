package netns

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/onebox-project/onebox/internal/testenv"
)

// TestMain doubles as a helper process run inside host namespaces (NETNS_HELPER).
func TestMain(m *testing.M) {
	if mode := os.Getenv("NETNS_HELPER"); mode != "" {
		if err := helper(mode, os.Getenv("ADDR")); err != nil {
			fmt.Fprintln(os.Stderr, "helper:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func helper(mode, addr string) error {
	switch mode {
	case "serve": // TCP echo server, forever (Close must kill it)
		ln, err := net.Listen("tcp4", addr)
		if err != nil {
			return err
		}
		fmt.Println("ready")
		for {
			c, err := ln.Accept()
			if err != nil {
				return err
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	case "dial":
		c, err := net.DialTimeout("tcp4", addr, 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(2 * time.Second))
		buf := make([]byte, 4)
		if _, err := c.Write([]byte("ping")); err != nil {
			return err
		}
		_, err = io.ReadFull(c, buf)
		return err
	case "mrecv":
		ifi, err := net.InterfaceByName("eth0")
		if err != nil {
			return err
		}
		c, err := net.ListenMulticastUDP("udp4", ifi, net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr)))
		if err != nil {
			return err
		}
		fmt.Println("ready")
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 100)
		n, from, err := c.ReadFromUDP(buf)
		if err != nil {
			return err
		}
		fmt.Printf("got %q from %v\n", buf[:n], from.IP)
		return nil
	case "msend":
		c, err := net.Dial("udp4", addr)
		if err != nil {
			return err
		}
		for range 10 {
			if _, err := c.Write([]byte("hello")); err != nil {
				return err
			}
			time.Sleep(100 * time.Millisecond)
		}
		return nil
	}
	return fmt.Errorf("unknown mode %q", mode)
}

func newLAN(t *testing.T, n int) (*LAN, []*Host) {
	t.Helper()
	testenv.NeedNoError(t, Available(), "network namespaces")
	ctx := t.Context()
	l, err := New(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Error(err)
		}
	})
	var hs []*Host
	for i := 1; i <= n; i++ {
		h, err := l.AddHost(ctx, fmt.Sprintf("h%d", i))
		if err != nil {
			t.Fatal(err)
		}
		hs = append(hs, h)
	}
	return l, hs
}

// start runs the helper in h and waits for it to print "ready"; it returns the
// rest of its stdout as a channel of lines.
func start(t *testing.T, l *LAN, h *Host, mode, addr string) (*exec.Cmd, <-chan string) {
	t.Helper()
	cmd := l.Command(t.Context(), h, os.Args[0])
	cmd.Env = append(os.Environ(), "NETNS_HELPER="+mode, "ADDR="+addr)
	cmd.Stderr = os.Stderr
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 10)
	go func() {
		defer close(lines)
		for sc := bufio.NewScanner(out); sc.Scan(); {
			lines <- sc.Text()
		}
	}()
	select {
	case s := <-lines:
		if s != "ready" {
			t.Fatalf("helper %s: %q", mode, s)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("helper %s not ready", mode)
	}
	return cmd, lines
}

func dial(t *testing.T, l *LAN, h *Host, addr string) error {
	cmd := l.Command(t.Context(), h, os.Args[0])
	cmd.Env = append(os.Environ(), "NETNS_HELPER=dial", "ADDR="+addr)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%v: %s", err, out)
	}
	return nil
}

func TestLAN(t *testing.T) {
	rootBefore := rootState(t)
	l, hs := newLAN(t, 3)
	h1, h2, h3 := hs[0], hs[1], hs[2]
	if got := len(l.Hosts()); got != 3 || h3.Addr != netip.MustParseAddr("10.199.0.13") {
		t.Fatalf("hosts %d, h3 %v", got, h3.Addr)
	}
	if _, err := l.AddHost(t.Context(), "h1"); err == nil {
		t.Error("duplicate host name accepted")
	}
	if _, err := l.AddHost(t.Context(), "waytoolongname"); err == nil {
		t.Error("long host name accepted")
	}
	addr := netip.AddrPortFrom(h2.Addr, 7777).String()
	srv, _ := start(t, l, h2, "serve", addr)
	done := make(chan error, 1)
	go func() { done <- srv.Wait() }()

	if err := dial(t, l, h1, addr); err != nil {
		t.Fatalf("h1->h2: %v", err)
	}
	if err := dial(t, l, h3, addr); err != nil {
		t.Fatalf("h3->h2: %v", err)
	}
	if err := l.Cut(t.Context(), h2); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if err := dial(t, l, h1, addr); err == nil {
		t.Fatal("h1->h2 works after Cut")
	} else {
		t.Logf("after Cut (%v): %v", time.Since(t0).Round(time.Millisecond), strings.TrimSpace(err.Error()))
	}
	if err := l.Heal(t.Context(), h2); err != nil {
		t.Fatal(err)
	}
	var err error
	for range 5 {
		if err = dial(t, l, h1, addr); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("h1->h2 after Heal: %v", err)
	}

	// Root namespace untouched and unable to reach the LAN. We do not dial
	// unless the route lookup says unreachable: a dial via the default route
	// would send packets off the machine.
	if after := rootState(t); after != rootBefore {
		t.Errorf("root namespace changed:\nbefore:\n%s\nafter:\n%s", rootBefore, after)
	}
	route, rerr := exec.Command("ip", "route", "get", h2.Addr.String()).CombinedOutput()
	t.Logf("root: ip route get %v: %s", h2.Addr, strings.TrimSpace(string(route)))
	if strings.Contains(string(route), "ob"+l.ID) || strings.Contains(string(route), " dev "+bridge) {
		t.Errorf("root routes into the LAN: %s", route)
	}
	if rerr != nil {
		if c, err := net.DialTimeout("tcp4", addr, time.Second); err == nil {
			c.Close()
			t.Error("root namespace reached", addr)
		}
	}

	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal("second Close:", err)
	}
	select {
	case <-done: // server killed by Close
	case <-time.After(5 * time.Second):
		t.Error("server in h2 survived Close")
	}
	if out, _ := exec.Command("ip", "netns", "list").Output(); strings.Contains(string(out), "obx-"+l.ID) {
		t.Errorf("namespaces left after Close:\n%s", out)
	}
}

// rootState is the root namespace's links, addresses and routes, minus
// counters that change on their own.
func rootState(t *testing.T) string {
	var b strings.Builder
	for _, args := range [][]string{{"-o", "link"}, {"-o", "addr"}, {"route", "show", "table", "all"}} {
		out, err := exec.Command("ip", args...).Output()
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(out), "\n") {
			if strings.Contains(line, "valid_lft") { // drop lifetimes
				line, _, _ = strings.Cut(line, "valid_lft")
			}
			b.WriteString(line + "\n")
		}
	}
	return b.String()
}

func TestMulticast(t *testing.T) {
	l, hs := newLAN(t, 3)
	for _, group := range []string{"239.255.77.77:17777", "224.0.0.251:5353"} { // plain group; mDNS
		_, lines2 := start(t, l, hs[1], "mrecv", group)
		_, lines3 := start(t, l, hs[2], "mrecv", group)
		sender := l.Command(t.Context(), hs[0], os.Args[0])
		sender.Env = append(os.Environ(), "NETNS_HELPER=msend", "ADDR="+group)
		if out, err := sender.CombinedOutput(); err != nil {
			t.Fatalf("msend %s: %v: %s", group, err, out)
		}
		for i, lines := range []<-chan string{lines2, lines3} {
			want := fmt.Sprintf("got \"hello\" from %v", hs[0].Addr)
			if got := <-lines; got != want {
				t.Errorf("%s: h%d received %q, want %q", group, i+2, got, want)
			}
		}
	}
}

func TestCleanupStale(t *testing.T) {
	l, _ := newLAN(t, 1)
	if err := CleanupStale(""); err == nil {
		t.Error("empty prefix accepted")
	}
	// A live LAN (lock held) is left alone...
	if err := CleanupStale("obx-" + l.ID); err != nil {
		t.Fatal(err)
	}
	if out, _ := exec.Command("ip", "netns", "list").Output(); !strings.Contains(string(out), "obx-"+l.ID+"-h1") {
		t.Fatalf("live LAN cleaned up:\n%s", out)
	}
	// ...a dead one is removed.
	l.lock.Close()
	if err := CleanupStale("obx-" + l.ID); err != nil {
		t.Fatal(err)
	}
	if out, _ := exec.Command("ip", "netns", "list").Output(); strings.Contains(string(out), "obx-"+l.ID) {
		t.Fatalf("stale namespaces left:\n%s", out)
	}
	l.lock = nil
}
