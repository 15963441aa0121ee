// Package netns builds a private LAN of network namespaces on one machine, for tests that cut links and kill hosts.
//
// Layout: a "hub" namespace holds a Linux bridge; each host is its own
// namespace joined to the bridge by a veth pair (hub side "ob<id><name>",
// host side "eth0"). Nothing is created in, or routed through, the root
// namespace, so LANs are invisible to the machine and to each other.
package netns

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// NamePrefix starts the name of every namespace this package creates.
const NamePrefix = "obx-"

// DefaultSubnet is the subnet of a new LAN; host i gets .10+i.
var DefaultSubnet = netip.MustParsePrefix("10.199.0.0/24")

const (
	cmdTimeout = 10 * time.Second
	bridge     = "br0"
	lockDir    = "/run/onebox-netns" // one flock'd file per live LAN, see CleanupStale
)

// LAN is a private virtual LAN: a hub namespace with a bridge, plus hosts.
type LAN struct {
	ID     string
	Subnet netip.Prefix

	hub    string // hub namespace name
	lock   *os.File
	mu     sync.Mutex
	hosts  []*Host
	next   int // index of the next host (1-based)
	closed bool
}

// Host is one namespace on the LAN with interface eth0 at Addr.
type Host struct {
	Name string // e.g. "h1"
	NS   string // namespace name
	Addr netip.Addr

	veth string // hub-side veth name
}

// ip runs `ip args...` with a bounded time; errors carry the command and its stderr.
func ip(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, cmdTimeout)
	defer cancel()
	var out, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "ip", args...)
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%v)", err, ctx.Err())
		}
		return "", fmt.Errorf("netns: ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out.String(), nil
}

func randID() string {
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 5)
	rand.Read(b)
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return string(b)
}

var avail = sync.OnceValue(func() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("netns: need root (euid %d)", os.Geteuid())
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return fmt.Errorf("netns: iproute2 not found: %v", err)
	}
	ctx := context.Background()
	probe := NamePrefix + randID() + "-probe"
	if _, err := ip(ctx, "netns", "add", probe); err != nil {
		return err
	}
	_, err := ip(ctx, "netns", "del", probe)
	return err
})

// Available reports nil if this process can build LANs (root, working `ip netns`),
// otherwise an error saying why, suitable for t.Skip.
func Available() error { return avail() }

// New creates an empty LAN (hub namespace and bridge) on DefaultSubnet.
func New(ctx context.Context) (*LAN, error) {
	if err := Available(); err != nil {
		return nil, err
	}
	l := &LAN{ID: randID(), Subnet: DefaultSubnet, next: 1}
	l.hub = NamePrefix + l.ID + "-hub"
	if err := os.MkdirAll(lockDir, 0o755); err != nil {
		return nil, fmt.Errorf("netns: %v", err)
	}
	f, err := os.OpenFile(filepath.Join(lockDir, l.ID+".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("netns: %v", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("netns: lock %s: %v", f.Name(), err)
	}
	l.lock = f
	steps := [][]string{
		{"netns", "add", l.hub},
		{"-n", l.hub, "link", "set", "lo", "up"},
		// No STP and no snooping: ports forward at once and multicast floods to all hosts.
		{"-n", l.hub, "link", "add", bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0", "mcast_snooping", "0"},
		{"-n", l.hub, "link", "set", bridge, "up"},
	}
	for _, s := range steps {
		if _, err := ip(ctx, s...); err != nil {
			l.Close()
			return nil, err
		}
	}
	return l, nil
}

// AddHost creates a namespace named name (1-8 chars of [a-z0-9]) joined to the
// LAN, with lo up, eth0 at the next address, and a multicast route on eth0.
// On failure, whatever was made is removed.
func (l *LAN) AddHost(ctx context.Context, name string) (*Host, error) {
	if !validName(name) {
		return nil, fmt.Errorf("netns: bad host name %q (want 1-8 chars of [a-z0-9], not \"hub\")", name)
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil, errors.New("netns: LAN closed")
	}
	for _, h := range l.hosts {
		if h.Name == name {
			l.mu.Unlock()
			return nil, fmt.Errorf("netns: host %q exists", name)
		}
	}
	idx := l.next
	l.next++
	l.mu.Unlock()

	a := l.Subnet.Masked().Addr().As4()
	n := int(a[3]) + 10 + idx
	a[2] += byte(n >> 8)
	a[3] = byte(n)
	addr := netip.AddrFrom4(a)
	if n > 0xffff || !l.Subnet.Contains(addr) || addr == lastAddr(l.Subnet) {
		return nil, fmt.Errorf("netns: subnet %v full", l.Subnet)
	}
	h := &Host{Name: name, NS: NamePrefix + l.ID + "-" + name, Addr: addr, veth: "ob" + l.ID + name}
	cidr := netip.PrefixFrom(addr, l.Subnet.Bits()).String()
	steps := [][]string{
		{"netns", "add", h.NS},
		// Create the pair in the hub with the peer straight in the host: never in the root ns.
		{"-n", l.hub, "link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.NS},
		{"-n", l.hub, "link", "set", h.veth, "master", bridge, "up"},
		{"-n", h.NS, "link", "set", "lo", "up"},
		{"-n", h.NS, "addr", "add", cidr, "dev", "eth0"},
		{"-n", h.NS, "link", "set", "eth0", "multicast", "on", "up"},
		{"-n", h.NS, "route", "add", "224.0.0.0/4", "dev", "eth0"},
	}
	for i, s := range steps {
		if _, err := ip(ctx, s...); err != nil {
			if i > 0 {
				ctx := context.WithoutCancel(ctx)
				ip(ctx, "-n", l.hub, "link", "del", h.veth)
				ip(ctx, "netns", "del", h.NS)
			}
			return nil, err
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed { // raced with Close
		delNS(h.NS)
		return nil, errors.New("netns: LAN closed")
	}
	l.hosts = append(l.hosts, h)
	return h, nil
}

func validName(s string) bool {
	if len(s) == 0 || len(s) > 8 || s == "hub" || s == "probe" {
		return false
	}
	for _, c := range s {
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') {
			return false
		}
	}
	return true
}

func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr().As4()
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	v |= 1<<(32-p.Bits()) - 1
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// Hosts returns the hosts in the order they were added.
func (l *LAN) Hosts() []*Host {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]*Host(nil), l.hosts...)
}

// Command returns a command that runs name inside h's namespace.
func (l *LAN) Command(ctx context.Context, h *Host, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", h.NS, name}, args...)...)
}

// Cut takes h's link down at the bridge: h is isolated from the LAN.
func (l *LAN) Cut(ctx context.Context, h *Host) error {
	_, err := ip(ctx, "-n", l.hub, "link", "set", h.veth, "down")
	return err
}

// Heal brings h's link back up after Cut.
func (l *LAN) Heal(ctx context.Context, h *Host) error {
	_, err := ip(ctx, "-n", l.hub, "link", "set", h.veth, "up")
	return err
}

// Close kills every process left in the LAN's namespaces and deletes them.
// It is idempotent, tries everything and returns the first error.
func (l *LAN) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	hosts := l.hosts
	l.mu.Unlock()
	var first error
	for _, h := range hosts {
		if err := delNS(h.NS); err != nil && first == nil {
			first = err
		}
	}
	if err := delNS(l.hub); err != nil && first == nil {
		first = err
	}
	if l.lock != nil {
		os.Remove(l.lock.Name())
		l.lock.Close() // releases the flock
	}
	return first
}

// delNS SIGKILLs the processes in namespace ns, then deletes it.
func delNS(ns string) error {
	if _, err := os.Stat(filepath.Join("/run/netns", ns)); os.IsNotExist(err) {
		return nil // already gone
	}
	ctx := context.Background()
	var first error
	for range 3 { // processes may fork while we kill
		out, err := ip(ctx, "netns", "pids", ns)
		if err != nil {
			first = err
			break
		}
		pids := strings.Fields(out)
		if len(pids) == 0 {
			break
		}
		for _, p := range pids {
			if pid, err := strconv.Atoi(p); err == nil {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	if _, err := ip(ctx, "netns", "del", ns); err != nil {
		if _, statErr := os.Stat(filepath.Join("/run/netns", ns)); !os.IsNotExist(statErr) {
			return err
		}
	}
	return first
}

// CleanupStale deletes namespaces whose names start with prefix (which must
// start with "obx") left behind by crashed runs, killing processes inside.
// Namespaces of a LAN still open in some live process are left alone.
func CleanupStale(prefix string) error {
	if !strings.HasPrefix(prefix, "obx") {
		return fmt.Errorf("netns: CleanupStale: prefix %q does not start with \"obx\"", prefix)
	}
	out, err := ip(context.Background(), "netns", "list")
	if err != nil {
		return err
	}
	var first error
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || !strings.HasPrefix(f[0], prefix) || live(f[0]) {
			continue
		}
		if err := delNS(f[0]); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// live reports whether ns ("obx-<id>-...") belongs to a LAN whose lock file is
// flock'd by a running process.
func live(ns string) bool {
	rest, ok := strings.CutPrefix(ns, NamePrefix)
	id, _, ok2 := strings.Cut(rest, "-")
	if !ok || !ok2 || len(id) != 5 {
		return false
	}
	f, err := os.OpenFile(filepath.Join(lockDir, id+".lock"), os.O_RDWR, 0)
	if err != nil {
		return false
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		return true
	}
	os.Remove(f.Name()) // stale lock of a dead process
	return false
}
