// Package testbed starts a cluster of real onebox agent processes on this
// machine, on loopback or each in its own network namespace, and lets a
// test (or 'onebox dev' and 'onebox demo') kill agents, cut and heal links,
// restart nodes and wait for the cluster to reach a condition. Later
// capabilities (memory, processes, I/O) test with it too.
package testbed

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/onebox-project/onebox/agent"
	"github.com/onebox-project/onebox/fabric/api"
	"github.com/onebox-project/onebox/fabric/membership"
	"github.com/onebox-project/onebox/testbed/netns"
)

// Options of a test cluster.
type Options struct {
	Nodes int  // how many agents; default 3
	NetNS bool // each agent in its own network namespace (root only)
	// Binary is the onebox executable; default: this executable, which is
	// right for 'onebox dev' (tests use Build).
	Binary string
	// Dir holds the nodes' data directories; default: a new temporary
	// directory that Close removes.
	Dir          string
	DonateMemory string // per node; default "256MiB"
	// Discover lets agents announce themselves by mDNS (off by default on
	// loopback, where multicast does not work).
	Discover bool
	// AgentArgs are extra flags for every agent.
	AgentArgs []string
	// StartTimeout bounds Start; default 60s.
	StartTimeout time.Duration
	// Logf, if set, receives progress lines.
	Logf func(format string, args ...any)
}

// Node is one agent of the test cluster.
type Node struct {
	Name    string
	DataDir string
	Socket  string      // the agent's API socket
	Host    *netns.Host // nil on loopback
	Ready   agent.Ready // as written by the agent when it last became ready

	// byDiscovery: the node is given the token but no --join address, and
	// must find the cluster by LAN discovery.
	byDiscovery bool

	mu   sync.Mutex
	cmd  *exec.Cmd     // guarded by mu
	done chan struct{} // closed when cmd exits; guarded by mu
	err  error         // exit error, valid after done; guarded by mu
}

// Agent is the address for --agent / ONEBOX_AGENT.
func (n *Node) Agent() string { return "unix://" + n.Socket }

// Running reports whether the node's agent process is alive.
func (n *Node) Running() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.done == nil {
		return false
	}
	select {
	case <-n.done:
		return false
	default:
		return true
	}
}

// Cluster is a running test cluster.
type Cluster struct {
	Dir   string
	Token string
	Nodes []*Node

	opts   Options
	ownDir bool
	lan    *netns.LAN
}

// Start creates the cluster: the first node runs 'onebox init', the others
// join it with the token, and Start returns once every node sees all nodes
// alive. On error everything created is removed.
func Start(ctx context.Context, opts Options) (_ *Cluster, err error) {
	if opts.Nodes == 0 {
		opts.Nodes = 3
	}
	if opts.Nodes < 1 || opts.Nodes > 200 {
		return nil, fmt.Errorf("testbed: %d nodes: want 1..200", opts.Nodes)
	}
	if opts.DonateMemory == "" {
		opts.DonateMemory = "256MiB"
	}
	if opts.StartTimeout == 0 {
		opts.StartTimeout = 60 * time.Second
	}
	if opts.Logf == nil {
		opts.Logf = func(string, ...any) {}
	}
	if opts.Binary == "" {
		if opts.Binary, err = os.Executable(); err != nil {
			return nil, fmt.Errorf("testbed: %w", err)
		}
	}
	c := &Cluster{opts: opts, Dir: opts.Dir}
	if c.Dir == "" {
		// Short: unix socket paths must stay under 108 bytes.
		if c.Dir, err = os.MkdirTemp("", "obx"); err != nil {
			return nil, fmt.Errorf("testbed: %w", err)
		}
		c.ownDir = true
	}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(ctx, opts.StartTimeout)
	defer cancel()
	if opts.NetNS {
		if err := netns.Available(); err != nil {
			return nil, fmt.Errorf("testbed: --netns needs network namespaces: %w", err)
		}
		if c.lan, err = netns.New(ctx); err != nil {
			return nil, err
		}
	}
	for i := 1; i <= opts.Nodes; i++ {
		if _, err := c.newNode(ctx, fmt.Sprintf("n%d", i)); err != nil {
			return nil, err
		}
	}
	first := c.Nodes[0]
	opts.Logf("creating cluster on %s", first.Name)
	out, err := c.command(ctx, first, "init", "--data-dir", first.DataDir, "--name", first.Name,
		"--advertise", c.addr(first), "-o", "json").Output()
	if err != nil {
		return nil, fmt.Errorf("testbed: onebox init: %w: %s", err, exitText(err))
	}
	var initOut struct{ Token string }
	if err := json.Unmarshal(out, &initOut); err != nil {
		return nil, fmt.Errorf("testbed: onebox init output: %w", err)
	}
	c.Token = initOut.Token
	if err := c.StartNode(ctx, first); err != nil {
		return nil, err
	}
	opts.Logf("%s ready at %s", first.Name, first.Ready.FabricAddr)
	var wg sync.WaitGroup
	errs := make([]error, len(c.Nodes))
	for i, n := range c.Nodes[1:] {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = c.StartNode(ctx, n)
			if errs[i] == nil {
				opts.Logf("%s joined", n.Name)
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	for _, n := range c.Nodes {
		if err := c.WaitAlive(ctx, n, opts.Nodes); err != nil {
			return nil, err
		}
	}
	return c, nil
}

func (c *Cluster) newNode(ctx context.Context, name string) (*Node, error) {
	n := &Node{Name: name, DataDir: filepath.Join(c.Dir, name)}
	n.Socket = filepath.Join(n.DataDir, "agent.sock")
	if err := os.MkdirAll(filepath.Join(n.DataDir, "scratch"), 0o700); err != nil {
		return nil, fmt.Errorf("testbed: %w", err)
	}
	if c.lan != nil {
		h, err := c.lan.AddHost(ctx, name)
		if err != nil {
			return nil, err
		}
		n.Host = h
	}
	c.Nodes = append(c.Nodes, n)
	return n, nil
}

// AddNode starts one more node that joins the cluster.
func (c *Cluster) AddNode(ctx context.Context) (*Node, error) {
	n, err := c.newNode(ctx, fmt.Sprintf("n%d", len(c.Nodes)+1))
	if err != nil {
		return nil, err
	}
	return n, c.StartNode(ctx, n)
}

// AddNodeByDiscovery starts one more node with the token but no --join
// address: it must find the cluster by mDNS (netns clusters with Discover).
func (c *Cluster) AddNodeByDiscovery(ctx context.Context) (*Node, error) {
	if !c.opts.Discover {
		return nil, errors.New("testbed: AddNodeByDiscovery needs Options.Discover")
	}
	n, err := c.newNode(ctx, fmt.Sprintf("n%d", len(c.Nodes)+1))
	if err != nil {
		return nil, err
	}
	n.byDiscovery = true
	return n, c.StartNode(ctx, n)
}

// Node returns the node named name, or nil.
func (c *Cluster) Node(name string) *Node {
	for _, n := range c.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

func (c *Cluster) addr(n *Node) string {
	if n.Host != nil {
		return n.Host.Addr.String()
	}
	return "127.0.0.1"
}

func (c *Cluster) command(ctx context.Context, n *Node, args ...string) *exec.Cmd {
	if n.Host != nil {
		return c.lan.Command(ctx, n.Host, c.opts.Binary, args...)
	}
	return exec.CommandContext(ctx, c.opts.Binary, args...)
}

// AgentArgs are the flags StartNode gives the node's agent.
func (c *Cluster) AgentArgs(n *Node) []string {
	args := []string{"agent", "--data-dir", n.DataDir, "--name", n.Name,
		"--bind", c.addr(n), "--advertise", c.addr(n),
		"--donate-memory", c.opts.DonateMemory,
		"--export", "scratch=" + filepath.Join(n.DataDir, "scratch"),
		"--reconnect-interval", "2s"}
	if n.Host == nil {
		// Many agents share loopback: each takes free ports the first
		// time, and keeps them across restarts as a real agent would. On
		// a netns host the default ports are the host's own.
		args = append(args, "--gossip-port", portOf(n.Ready.GossipAddr), "--fabric-port", portOf(n.Ready.FabricAddr))
	}
	if _, err := os.Stat("/dev/fuse"); err == nil && os.Geteuid() == 0 {
		args = append(args, "--mount", filepath.Join(n.DataDir, "mnt")) // the cluster filesystem
	} else {
		args = append(args, "--mount", "none") // never the machine's default /onebox
	}
	if !c.opts.Discover {
		args = append(args, "--no-discover")
	}
	// The token travels in the environment (StartNode), not in argv.
	if n != c.Nodes[0] && !n.byDiscovery {
		for _, o := range c.Nodes {
			if o != n && o.Ready.FabricAddr != "" {
				args = append(args, "--join", o.Ready.FabricAddr)
				break
			}
		}
	}
	return append(args, c.opts.AgentArgs...)
}

// StartNode starts (or restarts) the node's agent and waits until it is
// ready. Its output goes to DATA_DIR/agent.log.
func (c *Cluster) StartNode(ctx context.Context, n *Node) error {
	if n.Running() {
		return fmt.Errorf("testbed: %s is already running", n.Name)
	}
	readyPath := filepath.Join(n.DataDir, agent.ReadyFile)
	os.Remove(readyPath) // a killed agent leaves its ready file behind
	logf, err := os.OpenFile(filepath.Join(n.DataDir, "agent.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("testbed: %w", err)
	}
	// Not CommandContext: the agent must outlive the start-up context.
	cmd := c.command(context.Background(), n, c.AgentArgs(n)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), "ONEBOX_TOKEN="+c.Token)
	// Own process group: a Ctrl-C on 'onebox dev' reaches dev, which stops
	// the agents in order; Pdeathsig: agents never outlive their parent.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("testbed: start %s: %w", n.Name, err)
	}
	done := make(chan struct{})
	n.mu.Lock()
	n.cmd, n.done, n.err = cmd, done, nil
	n.mu.Unlock()
	go func() {
		err := cmd.Wait()
		logf.Close()
		n.mu.Lock()
		n.err = err
		n.mu.Unlock()
		close(done)
	}()
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-done:
			return fmt.Errorf("testbed: agent %s exited during start-up (%v); log:\n%s", n.Name, n.exitErr(), tail(filepath.Join(n.DataDir, "agent.log"), 15))
		case <-ctx.Done():
			c.Kill(n)
			return fmt.Errorf("testbed: agent %s not ready: %w; log:\n%s", n.Name, ctx.Err(), tail(filepath.Join(n.DataDir, "agent.log"), 15))
		case <-t.C:
			b, err := os.ReadFile(readyPath)
			if err != nil {
				continue
			}
			var r agent.Ready
			if json.Unmarshal(b, &r) == nil && r.PID == cmd.Process.Pid {
				n.Ready = r
				return nil
			}
		}
	}
}

func (n *Node) exitErr() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.err
}

// Kill ends the node's agent with SIGKILL, as a crash would, and waits for it.
func (c *Cluster) Kill(n *Node) error { return n.signal(syscall.SIGKILL, 10*time.Second) }

// Stop asks the agent to leave gracefully (SIGTERM) and waits up to 15 s,
// then kills it.
func (c *Cluster) Stop(n *Node) error {
	if err := n.signal(syscall.SIGTERM, 15*time.Second); err != nil {
		return n.signal(syscall.SIGKILL, 10*time.Second)
	}
	return nil
}

func (n *Node) signal(sig syscall.Signal, wait time.Duration) error {
	n.mu.Lock()
	cmd, done := n.cmd, n.done
	n.mu.Unlock()
	if cmd == nil {
		return nil
	}
	select {
	case <-done:
		return nil
	default:
	}
	_ = cmd.Process.Signal(sig)
	select {
	case <-done:
		return nil
	case <-time.After(wait):
		return fmt.Errorf("testbed: %s did not exit within %v of %v", n.Name, wait, sig)
	}
}

// Cut isolates the node's host from the LAN (netns clusters only).
func (c *Cluster) Cut(ctx context.Context, n *Node) error {
	if n.Host == nil {
		return errors.New("testbed: cutting links needs a netns cluster")
	}
	return c.lan.Cut(ctx, n.Host)
}

// Heal reconnects a cut node.
func (c *Cluster) Heal(ctx context.Context, n *Node) error {
	if n.Host == nil {
		return errors.New("testbed: healing links needs a netns cluster")
	}
	return c.lan.Heal(ctx, n.Host)
}

// Client returns an API client for the node's agent.
func (c *Cluster) Client(n *Node) *api.Client {
	cl, err := api.NewClient(n.Agent(), nil)
	if err != nil {
		panic(err) // a unix address always parses
	}
	return cl
}

// WaitFor polls cond every 100 ms until it reports true, ctx ends or
// timeout passes; the error says what was awaited and the last error cond
// returned.
func WaitFor(ctx context.Context, timeout time.Duration, what string, cond func(context.Context) (bool, error)) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	for {
		ok, err := cond(ctx)
		if ok {
			return nil
		}
		if err != nil {
			last = err
		}
		select {
		case <-ctx.Done():
			if last != nil {
				return fmt.Errorf("testbed: timed out after %v waiting for %s (last error: %v)", timeout, what, last)
			}
			return fmt.Errorf("testbed: timed out after %v waiting for %s", timeout, what)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Members returns the membership as seen by observer.
func (c *Cluster) Members(ctx context.Context, observer *Node) (map[string]membership.Status, error) {
	nr, err := c.Client(observer).Nodes(ctx)
	if err != nil {
		return nil, err
	}
	m := map[string]membership.Status{}
	for _, n := range nr.Nodes {
		m[n.Name] = n.Status
	}
	return m, nil
}

// WaitAlive waits until observer sees want nodes alive (bounded by ctx).
func (c *Cluster) WaitAlive(ctx context.Context, observer *Node, want int) error {
	return WaitFor(ctx, time.Hour, fmt.Sprintf("%s to see %d nodes alive", observer.Name, want), func(ctx context.Context) (bool, error) {
		m, err := c.Members(ctx, observer)
		alive := 0
		for _, s := range m {
			if s == membership.StatusAlive {
				alive++
			}
		}
		return alive == want, err
	})
}

// WaitStatus waits until observer sees node target in one of the statuses.
func (c *Cluster) WaitStatus(ctx context.Context, timeout time.Duration, observer *Node, target string, want ...membership.Status) error {
	return WaitFor(ctx, timeout, fmt.Sprintf("%s to see %s %v", observer.Name, target, want), func(ctx context.Context) (bool, error) {
		m, err := c.Members(ctx, observer)
		for _, w := range want {
			if m[target] == w {
				return true, nil
			}
		}
		return false, err
	})
}

// Close stops every agent (gracefully, then by force), removes the network
// namespaces and, if Start created it, the directory.
func (c *Cluster) Close() error {
	var wg sync.WaitGroup
	for _, n := range c.Nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.Stop(n)
		}()
	}
	wg.Wait()
	var errs []error
	if c.lan != nil {
		errs = append(errs, c.lan.Close())
	}
	if c.ownDir {
		errs = append(errs, os.RemoveAll(c.Dir))
	}
	return errors.Join(errs...)
}

// Build compiles the onebox binary into dir and returns its path; tests use
// it so that they run the code under test, not an installed onebox.
func Build(dir string) (string, error) {
	out := filepath.Join(dir, "onebox")
	cmd := exec.Command("go", "build", "-o", out, "github.com/onebox-project/onebox/cmd/onebox")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("testbed: go build: %w: %s", err, stderr.String())
	}
	return out, nil
}

// FreePort returns a TCP port free on 127.0.0.1 right now.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func tail(path string, lines int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "(no log)"
	}
	ls := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(ls) > lines {
		ls = ls[len(ls)-lines:]
	}
	return "  " + strings.Join(ls, "\n  ")
}

func exitText(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return strings.TrimSpace(string(ee.Stderr))
	}
	return ""
}

func portOf(addr string) string {
	if _, p, err := net.SplitHostPort(addr); err == nil {
		return p
	}
	return "-1"
}
