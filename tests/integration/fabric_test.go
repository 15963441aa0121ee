package integration

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/onebox-project/onebox/fabric/api"
	"github.com/onebox-project/onebox/fabric/identity"
	"github.com/onebox-project/onebox/fabric/membership"
	"github.com/onebox-project/onebox/fabric/pki"
	"github.com/onebox-project/onebox/testbed"
)

// A 3-node cluster forms; the CLI's JSON is parseable from any node, every
// node sees three alive members, and the totals are the sum of the nodes.
func TestClusterFormsAndTotalsAddUp(t *testing.T) {
	t.Parallel()
	c := startCluster(t, testbed.Options{Nodes: 3, DonateMemory: "300MiB"})
	for _, n := range c.Nodes {
		r := cli(t, nil, "nodes", "-o", "json", "--agent", n.Agent())
		if r.code != 0 {
			t.Fatalf("nodes via %s: exit %d: %s", n.Name, r.code, r.stderr)
		}
		var nr api.NodesResponse
		if err := json.Unmarshal([]byte(r.stdout), &nr); err != nil {
			t.Fatalf("nodes -o json is not JSON: %v\n%s", err, r.stdout)
		}
		if len(nr.Nodes) != 3 {
			t.Fatalf("%s sees %d nodes, want 3", n.Name, len(nr.Nodes))
		}
		var sum api.Totals
		for _, node := range nr.Nodes {
			if node.Status != membership.StatusAlive || node.Info == nil {
				t.Fatalf("%s sees %s as %s (info %v, error %q)", n.Name, node.Name, node.Status, node.Info != nil, node.Error)
			}
			if node.Info.Name != node.Name || node.Info.ClusterID != nr.ClusterID {
				t.Errorf("node %s reports name %q cluster %q", node.Name, node.Info.Name, node.Info.ClusterID)
			}
			sum.Nodes++
			sum.CPUs += node.Info.Resources.CPUs
			sum.MemTotalBytes += node.Info.Resources.MemTotalBytes
			sum.MemFreeBytes += node.Info.Resources.MemFreeBytes
			sum.PoolDonated += node.Info.Pool.DonatedBytes
		}
		tot := nr.Totals
		if tot.Nodes != sum.Nodes || tot.CPUs != sum.CPUs || tot.MemTotalBytes != sum.MemTotalBytes ||
			tot.MemFreeBytes != sum.MemFreeBytes || tot.PoolDonated != sum.PoolDonated {
			t.Errorf("totals %+v are not the sum of the nodes %+v", tot, sum)
		}
		if tot.PoolDonated != 3*300<<20 {
			t.Errorf("pool donated %d, want %d", tot.PoolDonated, 3*300<<20)
		}
	}

	// status -o json through ONEBOX_AGENT: the same machine as one.
	r := cli(t, []string{"ONEBOX_AGENT=" + c.Nodes[1].Agent()}, "status", "-o", "json")
	if r.code != 0 {
		t.Fatalf("status: exit %d: %s", r.code, r.stderr)
	}
	var st api.Status
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
		t.Fatalf("status -o json: %v", err)
	}
	if st.Members["alive"] != 3 || st.Nodes != 3 || st.Observer != "n2" {
		t.Errorf("status members %v nodes %d observer %s", st.Members, st.Nodes, st.Observer)
	}
	nr, err := c.Client(c.Nodes[0]).Nodes(ctxT(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if st.CPUs != nr.Totals.CPUs || st.MemTotalBytes != nr.Totals.MemTotalBytes || st.PoolDonated != nr.Totals.PoolDonated {
		t.Errorf("status totals (cpus %d mem %d pool %d) differ from nodes totals %+v", st.CPUs, st.MemTotalBytes, st.PoolDonated, nr.Totals)
	}
	if len(st.DiskList) != st.Disks || len(st.NICList) != st.NICs {
		t.Errorf("disk/NIC lists (%d, %d) do not match counts (%d, %d)", len(st.DiskList), len(st.NICList), st.Disks, st.NICs)
	}

	// Named nodes only; an unknown name is a failure that lists the known.
	r = cli(t, nil, "nodes", "-o", "json", "--agent", c.Nodes[0].Agent(), "n3", "n1")
	var two api.NodesResponse
	if err := json.Unmarshal([]byte(r.stdout), &two); err != nil || len(two.Nodes) != 2 || two.Totals.Nodes != 2 || two.Nodes[0].Name != "n3" {
		t.Errorf("nodes n3 n1: %v %s", err, r.stdout)
	}
	r = cli(t, nil, "nodes", "--agent", c.Nodes[0].Agent(), "n9")
	if r.code != 1 || !strings.Contains(r.stderr, `no node named "n9"`) || !strings.Contains(r.stderr, "known: n1, n2, n3") {
		t.Errorf("nodes n9: exit %d %q", r.code, r.stderr)
	}

	// The table form prints every node and a total line.
	r = cli(t, nil, "nodes", "--agent", c.Nodes[2].Agent())
	for _, want := range []string{"NAME", "n1", "n2", "n3", "TOTAL (3 nodes)", "alive"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("nodes table lacks %q:\n%s", want, r.stdout)
		}
	}
}

// A crashed agent is declared failed; a stopped one is seen as left; both
// come back when restarted from their data directory.
func TestFailureLeaveAndRejoin(t *testing.T) {
	t.Parallel()
	c := startCluster(t, testbed.Options{Nodes: 3})
	n1, n2, n3 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	ctx := ctxT(t, 2*time.Minute)

	if err := c.Kill(n3); err != nil {
		t.Fatal(err)
	}
	// The issue asks for detection within 10 s; the bound here is looser so
	// a loaded CI machine does not fail the test, and the demo and the
	// membership benchmark report the measured time.
	for _, obs := range []*testbed.Node{n1, n2} {
		if err := c.WaitStatus(ctx, 30*time.Second, obs, "n3", membership.StatusFailed); err != nil {
			t.Fatal(err)
		}
	}
	st, err := c.Client(n1).Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Members["failed"] != 1 || st.Nodes != 2 {
		t.Errorf("after a crash: members %v, counted nodes %d (want 1 failed, 2 counted)", st.Members, st.Nodes)
	}

	if err := c.StartNode(ctx, n3); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitStatus(ctx, 30*time.Second, n1, "n3", membership.StatusAlive); err != nil {
		t.Fatal(err)
	}

	if err := c.Stop(n2); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitStatus(ctx, 30*time.Second, n1, "n2", membership.StatusLeft); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(n2.DataDir, "agent.log")); !strings.Contains(string(b), "leaving the cluster") {
		t.Errorf("a SIGTERM'd agent should log its graceful leave")
	}
	if err := c.StartNode(ctx, n2); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitAlive(ctx, n1, 3); err != nil {
		t.Fatal(err)
	}
}

// Joining is refused, with a clear error on both sides, for a wrong
// secret, for a token of another cluster, for a name a live member has,
// and for a data directory that belongs to another cluster.
func TestJoinRefusals(t *testing.T) {
	t.Parallel()
	c := startCluster(t, testbed.Options{Nodes: 2})
	n1 := c.Nodes[0]
	tok, err := pki.ParseToken(c.Token)
	if err != nil {
		t.Fatal(err)
	}
	other := t.TempDir()
	otherID, err := identity.Init(filepath.Join(other, "x"), "x1", nil)
	if err != nil {
		t.Fatal(err)
	}

	join := func(name, dataDir, token string) cliResult {
		return cli(t, nil, "agent", "--name", name, "--data-dir", dataDir, "--bind", "127.0.0.1",
			"--gossip-port", "-1", "--fabric-port", "-1", "--no-discover",
			"--join", n1.Ready.FabricAddr, "--token", token)
	}
	wrongSecret := pki.Token{CAFingerprint: tok.CAFingerprint, Secret: strings.Repeat("0", 32)}
	cases := []struct {
		name, node, token, dataDir string
		want                       string
	}{
		{"wrong secret", "w1", wrongSecret.String(), "", "invalid join token"},
		{"token of another cluster", "w2", otherID.Token.String(), "", "belongs to another cluster"},
		{"duplicate live name", "n2", c.Token, "", `"n2" is already used by a live member`},
		{"data dir of another cluster", "x1", c.Token, filepath.Join(other, "x"), "belongs to cluster " + otherID.ClusterID},
		{"malformed token", "w3", "obx1.nothex", "", "malformed join token"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dd := tc.dataDir
			if dd == "" {
				dd = filepath.Join(t.TempDir(), "d")
			}
			r := join(tc.node, dd, tc.token)
			if r.code == 0 || !strings.Contains(r.stderr, tc.want) {
				t.Fatalf("exit %d, stderr %q; want a failure mentioning %q", r.code, r.stderr, tc.want)
			}
			if tc.dataDir == "" {
				if _, err := os.Stat(filepath.Join(dd, "node.crt")); err == nil {
					t.Errorf("a refused node must not be left with a certificate")
				}
			}
		})
	}
	// The admitting side logged (rate-limited) and counted the refusals.
	log, _ := os.ReadFile(filepath.Join(n1.DataDir, "agent.log"))
	if !strings.Contains(string(log), "join refused") || !strings.Contains(string(log), "code=bad_token") {
		t.Errorf("n1's log lacks the first refusal")
	}
	metrics := scrape(t, n1)
	for _, want := range []string{`onebox_join_requests_total{result="bad_token"} 1`, `onebox_join_requests_total{result="name_taken"} 1`, `onebox_join_requests_total{result="ok"} 1`} {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	// Nothing of the refused nodes reached the membership.
	m, err := c.Members(ctxT(t, 10*time.Second), n1)
	if err != nil {
		t.Fatal(err)
	}
	if len(m) != 2 {
		t.Errorf("members after refusals: %v", m)
	}
}

// The control API on the fabric port is reached only with a certificate
// signed by the cluster CA; no certificate, a certificate of another CA and
// garbage all fail at the handshake and leave the agent serving.
func TestFabricPortNeedsClusterCertificate(t *testing.T) {
	t.Parallel()
	c := startCluster(t, testbed.Options{Nodes: 2})
	n1, n2 := c.Nodes[0], c.Nodes[1]
	addr := n1.Ready.FabricAddr
	member, err := identity.Load(n2.DataDir)
	if err != nil {
		t.Fatal(err)
	}
	stranger, err := identity.Init(filepath.Join(t.TempDir(), "s"), "n2", nil) // same name, other CA
	if err != nil {
		t.Fatal(err)
	}
	get := func(cfg *tls.Config) (int, error) {
		hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}
		resp, err := hc.Get("https://" + addr + api.PathSelf)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		io.Copy(io.Discard, resp.Body)
		return resp.StatusCode, nil
	}
	if code, err := get(member.ClientTLS()); err != nil || code != 200 {
		t.Fatalf("member with a CA-signed certificate: code %d err %v", code, err)
	}
	noCert := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}, MinVersion: tls.VersionTLS13}
	if code, err := get(noCert); err == nil {
		t.Errorf("client without certificate got HTTP %d", code)
	}
	if code, err := get(stranger.ClientTLS()); err == nil {
		t.Errorf("client with another cluster's certificate got HTTP %d", code)
	}
	// The stranger also refuses n1: it is not of its cluster.
	if _, err := tls.Dial("tcp", addr, stranger.ClientTLS()); err == nil {
		t.Errorf("stranger accepted n1's certificate")
	}
	// Garbage, a plain HTTP request and a truncated ClientHello.
	for _, payload := range [][]byte{
		[]byte("GET /v1/self HTTP/1.1\r\nHost: x\r\n\r\n"),
		randomBytes(4096),
		{0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01},
	} {
		conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		conn.Write(payload)
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		b, _ := io.ReadAll(conn)
		conn.Close()
		if strings.Contains(string(b), "cluster_id") {
			t.Errorf("garbage got an API answer: %q", b)
		}
	}
	// Garbage on the gossip port, TCP and UDP, is dropped too.
	for _, network := range []string{"tcp", "udp"} {
		conn, err := net.DialTimeout(network, n1.Ready.GossipAddr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		conn.Write(randomBytes(1200))
		conn.Close()
	}
	// Still serving, still a cluster of two, and the rejections were counted.
	if code, err := get(member.ClientTLS()); err != nil || code != 200 {
		t.Fatalf("after garbage: code %d err %v", code, err)
	}
	if err := c.WaitAlive(ctxT(t, 20*time.Second), n1, 2); err != nil {
		t.Fatal(err)
	}
	if m := scrape(t, n1); !strings.Contains(m, `onebox_fabric_rejected_connections_total{reason="handshake"}`) {
		t.Errorf("rejected handshakes not counted")
	}
}

// Metrics are served on the API socket, on a private registry.
func TestMetrics(t *testing.T) {
	t.Parallel()
	c := startCluster(t, testbed.Options{Nodes: 2})
	c.Client(c.Nodes[0]).Nodes(ctxT(t, 10*time.Second)) // count one request
	m := scrape(t, c.Nodes[0])
	for _, want := range []string{
		`onebox_members{status="alive"} 2`,
		`onebox_members{status="failed"} 0`,
		`onebox_node_cpus `,
		`onebox_pool_bytes{kind="donated"} 2.68435456e+08`,
		`onebox_api_requests_total{code="200",endpoint="nodes",side="local"}`,
		`onebox_peer_request_duration_seconds_count{result="ok"}`,
		`go_goroutines `,
	} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

// CLI exit codes: 0 ok, 1 failure, 2 usage; errors say what to do.
func TestCLIExitCodes(t *testing.T) {
	t.Parallel()
	missing := "unix://" + filepath.Join(t.TempDir(), "none.sock")
	cases := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"version"}, 0, "onebox"},
		{[]string{"nodes", "-o", "yaml"}, 2, "unknown output format"},
		{[]string{"nodes", "--no-such-flag"}, 2, "unknown flag"},
		{[]string{"no-such-verb"}, 2, "unknown command"},
		{[]string{"nodes", "--agent", missing}, 1, "is 'onebox agent' running?"},
		{[]string{"nodes", "--agent", "ftp://x"}, 2, "must start with unix://"},
		{[]string{"agent", "--data-dir", t.TempDir(), "--no-discover", "--name", "a"}, 1, "run 'onebox init"},
		{[]string{"agent", "--donate-memory", "lots"}, 2, "bad size"},
		{[]string{"dev", "--nodes", "0"}, 2, "at least 1"},
	}
	for _, tc := range cases {
		r := cli(t, nil, tc.args...)
		if r.code != tc.code || !strings.Contains(r.stdout+r.stderr, tc.want) {
			t.Errorf("onebox %s: exit %d (want %d), output %q (want %q)", strings.Join(tc.args, " "), r.code, tc.code, r.stdout+r.stderr, tc.want)
		}
	}
}

// init writes the identity with mode 0600 and prints a join command that works.
func TestInitPrintsWorkingJoinCommand(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "d")
	r := cli(t, nil, "init", "--data-dir", dir, "--name", "m1", "--advertise", "127.0.0.1")
	if r.code != 0 {
		t.Fatalf("init: %d %s", r.code, r.stderr)
	}
	if !strings.Contains(r.stdout, "ONEBOX_TOKEN=obx1.") || !strings.Contains(r.stdout, "onebox agent --name NODE --join 127.0.0.1:7947") {
		t.Errorf("init output lacks the join command:\n%s", r.stdout)
	}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		fi, _ := e.Info()
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", e.Name(), fi.Mode().Perm())
		}
	}
	if fi, _ := os.Stat(dir); fi.Mode().Perm() != 0o700 {
		t.Errorf("data dir mode %v, want 0700", fi.Mode().Perm())
	}
	if r := cli(t, nil, "init", "--data-dir", dir, "--name", "m1"); r.code != 1 || !strings.Contains(r.stderr, "already holds a cluster identity") {
		t.Errorf("second init: exit %d %q", r.code, r.stderr)
	}
}

func scrape(t *testing.T, n *testbed.Node) string {
	t.Helper()
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(_ context.Context, _, _ string) (net.Conn, error) { return net.Dial("unix", n.Socket) },
	}}
	resp, err := hc.Get("http://agent/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rand.IntN(256))
	}
	return b
}

// A node whose data directory belongs to another cluster cannot slip in
// with --join: it fails to start with a clear error, and the member it
// dialed logs a refused connection.
func TestNodeOfAnotherClusterRefused(t *testing.T) {
	t.Parallel()
	c := startCluster(t, testbed.Options{Nodes: 2})
	n1 := c.Nodes[0]
	dir := filepath.Join(t.TempDir(), "o")
	if _, err := identity.Init(dir, "intruder", nil); err != nil {
		t.Fatal(err)
	}
	r := cli(t, nil, "agent", "--data-dir", dir, "--bind", "127.0.0.1", "--gossip-port", "-1", "--fabric-port", "-1",
		"--no-discover", "--join", n1.Ready.FabricAddr)
	if r.code != 1 || !strings.Contains(r.stderr, "are not members of cluster") {
		t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
	}
	err := testbed.WaitFor(ctxT(t, 10*time.Second), 10*time.Second, "n1 to log the refusal", func(context.Context) (bool, error) {
		b, _ := os.ReadFile(filepath.Join(n1.DataDir, "agent.log"))
		return strings.Contains(string(b), "refused fabric connection"), nil
	})
	if err != nil {
		t.Error(err)
	}
	if m := scrape(t, n1); !strings.Contains(m, `onebox_fabric_rejected_connections_total{reason="bad_certificate"}`) {
		t.Errorf("bad certificate not counted")
	}
}
