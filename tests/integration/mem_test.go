package integration

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/onebox-project/onebox/fabric/api"
	"github.com/onebox-project/onebox/fabric/identity"
	"github.com/onebox-project/onebox/fabric/membership"
	"github.com/onebox-project/onebox/fabric/pki"
	"github.com/onebox-project/onebox/memory/pageproto"
	"github.com/onebox-project/onebox/testbed"
)

func memJSON(t *testing.T, n *testbed.Node) api.MemResponse {
	t.Helper()
	r := cli(t, nil, "mem", "-o", "json", "--agent", n.Agent())
	var m api.MemResponse
	if err := json.Unmarshal([]byte(r.stdout), &m); err != nil {
		t.Fatalf("mem -o json (exit %d): %v\n%s\n%s", r.code, err, r.stdout, r.stderr)
	}
	return m
}

func memNode(m api.MemResponse, name string) api.MemNode {
	for _, n := range m.Nodes {
		if n.Name == name {
			return n
		}
	}
	return api.MemNode{}
}

func probe(t *testing.T, n *testbed.Node, args ...string) cliResult {
	t.Helper()
	return cli(t, nil, append([]string{"mem", "probe", "--agent", n.Agent()}, args...)...)
}

// Pages stored through one agent live in 2 copies on the 2 other nodes
// and read back right; the pool refuses what it cannot hold; a node
// holding copies is killed: reads go on from the survivor, 'onebox mem'
// counts the under-replicated pages, and once a new node joins the pool
// copies them there until none is left; the copies are real (the old
// survivor can be lost too).
func TestMemPool(t *testing.T) {
	t.Parallel()
	c := startCluster(t, testbed.Options{Nodes: 3, DonateMemory: "64MiB"})
	n1, n2, n3 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	if r := probe(t, n1, "store", "--size", "16MiB", "--name", "t"); r.code != 0 {
		t.Fatalf("probe store: exit %d: %s%s", r.code, r.stdout, r.stderr)
	}
	if r := probe(t, n1, "verify", "--size", "16MiB", "--name", "t"); r.code != 0 {
		t.Fatalf("probe verify: exit %d: %s%s", r.code, r.stdout, r.stderr)
	}
	m := memJSON(t, n1)
	if m.Replicas != 2 || m.CapacityBytes != 3*64<<20 || m.UsedBytes != 2*16<<20 || m.UnderReplicatedPages != 0 {
		t.Fatalf("mem after storing 16 MiB: %+v", m)
	}
	self := memNode(m, "n1")
	if self.OwnedPages != 16<<20/4096 || self.UsedBytes != 0 || memNode(m, "n2").UsedBytes != 16<<20 || memNode(m, "n3").UsedBytes != 16<<20 {
		t.Fatalf("copies not on the two other nodes: %+v", m.Nodes)
	}
	// 'nodes' shows the pool use too, and the table prints.
	nr, err := c.Client(n1).Nodes(ctxT(t, 10*time.Second))
	if err != nil || nr.Totals.PoolUsed != 2*16<<20 {
		t.Fatalf("nodes: pool used %d, %v", nr.Totals.PoolUsed, err)
	}
	if r := cli(t, nil, "mem", "--agent", n1.Agent()); r.code != 0 || !strings.Contains(r.stdout, "replicas 2") || !strings.Contains(r.stdout, "n3") {
		t.Fatalf("mem table: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	} else {
		t.Logf("onebox mem:\n%s", r.stdout)
	}

	// Exhaustion: 2 copies of 100 MiB do not fit in 2 x 64 MiB.
	r := probe(t, n1, "reserve", "--size", "100MiB", "--name", "big")
	if r.code != 1 || !strings.Contains(r.stderr, "full") {
		t.Fatalf("reserve beyond the pool: exit %d: %s%s", r.code, r.stdout, r.stderr)
	}
	if r := probe(t, n1, "reserve", "--size", "32MiB", "--name", "ok"); r.code != 0 {
		t.Fatalf("reserve within the pool: exit %d: %s", r.code, r.stderr)
	}
	if r := probe(t, n1, "store", "--size", "60MiB", "--name", "huge"); r.code != 1 || !strings.Contains(r.stderr, "full") {
		t.Fatalf("store beyond the pool: exit %d: %s%s", r.code, r.stdout, r.stderr)
	}
	for _, name := range []string{"ok", "huge"} {
		if r := probe(t, n1, "drop", "--name", name); r.code != 0 {
			t.Fatalf("drop %s: %s", name, r.stderr)
		}
	}
	if m := memJSON(t, n1); m.UsedBytes != 2*16<<20 || m.ReservedBytes != 0 {
		t.Fatalf("after dropping the probes: used %d reserved %d", m.UsedBytes, m.ReservedBytes)
	}

	// Lose n3: reads go on from n2.
	if err := c.Kill(n3); err != nil {
		t.Fatal(err)
	}
	if r := probe(t, n1, "verify", "--size", "16MiB", "--name", "t"); r.code != 0 {
		t.Fatalf("verify with n3 dead: exit %d: %s", r.code, r.stderr)
	}
	if err := c.WaitStatus(ctxT(t, 60*time.Second), time.Minute, n1, "n3", membership.StatusFailed); err != nil {
		t.Fatal(err)
	}
	err = testbed.WaitFor(ctxT(t, 30*time.Second), 30*time.Second, "n1 to count the under-replicated pages", func(context.Context) (bool, error) {
		return memJSON(t, n1).UnderReplicatedPages == 16<<20/4096, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("onebox mem with n3 failed:\n%s", cli(t, nil, "mem", "--agent", n1.Agent()).stdout)
	// A new node: the pool copies the missing copies there.
	n4, err := c.AddNode(ctxT(t, 60*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	err = testbed.WaitFor(ctxT(t, 60*time.Second), time.Minute, "re-replication onto n4", func(context.Context) (bool, error) {
		m := memJSON(t, n1)
		return m.UnderReplicatedPages == 0 && memNode(m, "n4").UsedBytes == 16<<20, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if m := memJSON(t, n1); memNode(m, "n1").RepairedBytes != 16<<20 {
		t.Fatalf("repaired %d bytes, want 16 MiB", memNode(m, "n1").RepairedBytes)
	}
	// n4's copy is real: lose n2 as well.
	if err := c.Kill(n2); err != nil {
		t.Fatal(err)
	}
	if r := probe(t, n1, "verify", "--size", "16MiB", "--name", "t"); r.code != 0 {
		t.Fatalf("verify from n4 alone: exit %d: %s", r.code, r.stderr)
	}
	// n1 restarts: its programs are gone, so n4 drops what n1 stored.
	if err := c.Kill(n1); err != nil {
		t.Fatal(err)
	}
	if err := c.StartNode(ctxT(t, 60*time.Second), n1); err != nil {
		t.Fatal(err)
	}
	// (A restarted n1 may take ~30 s to merge back with n4: serf re-joins
	// through its snapshot, which may name only dead peers.)
	err = testbed.WaitFor(ctxT(t, 2*time.Minute), 2*time.Minute, "n4 to drop the pages of n1's previous run", func(context.Context) (bool, error) {
		return memNode(memJSON(t, n4), "n4").UsedBytes == 0, nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// The page port (ALPN onebox-page/1 on the fabric port) rejects garbage
// and truncated frames with a bad_frame answer and closes the
// connection; a client without a cluster certificate never reaches it.
func TestMemPagePortRejectsGarbage(t *testing.T) {
	t.Parallel()
	c := startCluster(t, testbed.Options{Nodes: 2, DonateMemory: "16MiB"})
	n1, n2 := c.Nodes[0], c.Nodes[1]
	member, err := identity.Load(n2.DataDir)
	if err != nil {
		t.Fatal(err)
	}
	cfg := member.ClientTLS()
	cfg.NextProtos = []string{pki.ProtoPage}
	hello := pageproto.AppendFrame(nil, pageproto.Header{Op: pageproto.OpHello, ID: 1, Arg: 99}, "", nil)
	store := pageproto.AppendFrame(nil, pageproto.Header{Op: pageproto.OpStore, ID: 2}, "x", make([]byte, 4096))
	oversized := make([]byte, pageproto.HeaderSize)
	(&pageproto.Header{Op: pageproto.OpStore, ID: 2, OwnerLen: 1, Length: 64 << 20}).Put(oversized)
	for name, payload := range map[string][]byte{
		"garbage":   randomBytes(4096),
		"truncated": append(bytes.Clone(hello), store[:2000]...),
		"oversized": append(bytes.Clone(hello), oversized...),
	} {
		conn, err := tls.Dial("tcp", n1.Ready.FabricAddr, cfg)
		if err != nil {
			t.Fatal(err)
		}
		if got := conn.ConnectionState().NegotiatedProtocol; got != pki.ProtoPage {
			t.Fatalf("negotiated %q, want %s", got, pki.ProtoPage)
		}
		conn.SetDeadline(time.Now().Add(20 * time.Second))
		conn.Write(payload)
		conn.CloseWrite()
		var last pageproto.Header
		var msg []byte
		for {
			h, p, err := pageproto.ReadFrame(conn, nil)
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("%s: reading answers: %v", name, err)
			}
			last, msg = h, p
		}
		conn.Close()
		if pageproto.Status(last.Arg) != pageproto.StatusBadFrame {
			t.Fatalf("%s: last answer %v %q, want bad_frame and the connection closed", name, pageproto.Status(last.Arg), msg)
		}
		t.Logf("%s: %s", name, msg)
	}
	noCert := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{pki.ProtoPage}, MinVersion: tls.VersionTLS13}
	if conn, err := tls.Dial("tcp", n1.Ready.FabricAddr, noCert); err == nil {
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		conn.Write(hello)
		if _, _, err := pageproto.ReadFrame(conn, nil); err == nil {
			t.Fatal("a client without a certificate was served pages")
		}
		conn.Close()
	}
	// Still serving members, and the rejections were counted.
	if r := probe(t, n2, "store", "--size", "1MiB"); r.code != 0 {
		t.Fatalf("store after garbage: %s", r.stderr)
	}
	if m := scrape(t, n1); !strings.Contains(m, `onebox_pool_page_requests_total{op="`) || !strings.Contains(m, `status="bad_frame"`) {
		t.Errorf("bad frames not counted")
	}
	// n2 leaves the cluster for good: n1 drops what it stored there.
	if memNode(memJSON(t, n1), "n1").UsedBytes != 1<<20 {
		t.Fatalf("n1 does not hold n2's probe: %+v", memJSON(t, n1).Nodes)
	}
	if err := c.Stop(n2); err != nil {
		t.Fatal(err)
	}
	err = testbed.WaitFor(ctxT(t, 60*time.Second), time.Minute, "n1 to drop the pages of n2, which left", func(context.Context) (bool, error) {
		return memNode(memJSON(t, n1), "n1").UsedBytes == 0, nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// In the netns testbed, the link of a node holding copies is cut (the
// node lives on, unreachable): reads fall back to the other copy within
// the request timeout, and once membership declares the node failed its
// copies are made again elsewhere.
func TestMemPoolCutLink(t *testing.T) {
	needNetns(t)
	t.Parallel()
	c := startCluster(t, testbed.Options{Nodes: 4, NetNS: true, DonateMemory: "64MiB"})
	n1 := c.Nodes[0]
	if r := probe(t, n1, "store", "--size", "16MiB", "--name", "cut"); r.code != 0 {
		t.Fatalf("probe store: exit %d: %s", r.code, r.stderr)
	}
	var victim *testbed.Node
	for _, n := range memJSON(t, n1).Nodes {
		if n.UsedBytes > 0 && victim == nil {
			victim = c.Node(n.Name)
		}
	}
	if victim == nil {
		t.Fatal("no node holds copies")
	}
	ctx := ctxT(t, 3*time.Minute)
	if err := c.Cut(ctx, victim); err != nil {
		t.Fatal(err)
	}
	if r := probe(t, n1, "verify", "--size", "16MiB", "--name", "cut"); r.code != 0 {
		t.Fatalf("verify with %s cut off: exit %d: %s", victim.Name, r.code, r.stderr)
	}
	if err := c.WaitStatus(ctx, 60*time.Second, n1, victim.Name, membership.StatusFailed); err != nil {
		t.Fatal(err)
	}
	err := testbed.WaitFor(ctx, time.Minute, "re-replication after the cut", func(context.Context) (bool, error) {
		m := memJSON(t, n1)
		used := uint64(0)
		for _, n := range m.Nodes {
			if n.Name != victim.Name && n.Error == "" {
				used += n.UsedBytes
			}
		}
		return m.UnderReplicatedPages == 0 && used == 2*16<<20, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if r := probe(t, n1, "verify", "--size", "16MiB", "--name", "cut"); r.code != 0 {
		t.Fatalf("verify after re-replication: exit %d: %s", r.code, r.stderr)
	}
	if err := c.Heal(ctx, victim); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitAlive(ctx, n1, 4); err != nil {
		t.Fatal(err)
	}
}
