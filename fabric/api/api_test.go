package api_test

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"net"
	"net/http"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/onebox-project/onebox/fabric/api"
	"github.com/onebox-project/onebox/fabric/identity"
	"github.com/onebox-project/onebox/fabric/membership"
	"github.com/onebox-project/onebox/fabric/resources"
)

// node builds a row of the cluster view; a nil res means no details.
func node(name string, st membership.Status, res *resources.Snapshot, pool api.Pool) api.Node {
	n := api.Node{Member: membership.Member{Name: name, Status: st}}
	if res != nil {
		n.Info = &api.NodeInfo{Name: name, Resources: *res, Pool: pool}
	}
	return n
}

func snap(cpus int, mem uint64, disks []resources.Disk, nics []resources.NIC) *resources.Snapshot {
	return &resources.Snapshot{CPUs: cpus, MemTotalBytes: mem, MemFreeBytes: mem / 2, Load1: 0.5, Procs: 100, Disks: disks, NICs: nics}
}

var (
	diskA = resources.Disk{Device: "/dev/vda1", Mountpoint: "/", TotalBytes: 1000, FreeBytes: 400}
	diskB = resources.Disk{Device: "/dev/vdb1", Mountpoint: "/data", TotalBytes: 5000, FreeBytes: 5000}
	nicA  = resources.NIC{Name: "eth0", MTU: 1500, Up: true}
	nicB  = resources.NIC{Name: "eth1", MTU: 9000}
)

func TestNodeCounts(t *testing.T) {
	tests := []struct {
		st   membership.Status
		info bool
		want bool
	}{
		{membership.StatusAlive, true, true},
		{membership.StatusSuspect, true, true},
		{membership.StatusAlive, false, false},
		{membership.StatusSuspect, false, false},
		{membership.StatusFailed, true, false},
		{membership.StatusLeft, true, false},
		{membership.StatusLeaving, true, false},
		{"", true, false},
	}
	for _, tt := range tests {
		var res *resources.Snapshot
		if tt.info {
			res = snap(1, 1, nil, nil)
		}
		if got := node("n", tt.st, res, api.Pool{}).Counts(); got != tt.want {
			t.Errorf("Counts(status %q, info %v) = %v, want %v", tt.st, tt.info, got, tt.want)
		}
	}
}

func TestSum(t *testing.T) {
	tests := []struct {
		name  string
		nodes []api.Node
		want  api.Totals
	}{
		{"no nodes", nil, api.Totals{}},
		{"one alive node", []api.Node{
			node("n1", membership.StatusAlive, snap(4, 8<<30, []resources.Disk{diskA}, []resources.NIC{nicA}), api.Pool{DonatedBytes: 1 << 30, UsedBytes: 1 << 20}),
		}, api.Totals{Nodes: 1, CPUs: 4, MemTotalBytes: 8 << 30, MemFreeBytes: 4 << 30, PoolDonated: 1 << 30, PoolUsed: 1 << 20,
			DiskTotalBytes: 1000, DiskFreeBytes: 400, Disks: 1, NICs: 1, Load1: 0.5, Procs: 100}},
		{"alive and suspect summed; failed, left, leaving and unknown not", []api.Node{
			node("n1", membership.StatusAlive, snap(4, 1000, []resources.Disk{diskA, diskB}, []resources.NIC{nicA, nicB}), api.Pool{DonatedBytes: 10}),
			node("n2", membership.StatusSuspect, snap(2, 500, []resources.Disk{diskB}, []resources.NIC{nicA}), api.Pool{DonatedBytes: 5, UsedBytes: 3}),
			node("n3", membership.StatusFailed, snap(64, 1<<40, []resources.Disk{diskA}, []resources.NIC{nicA}), api.Pool{DonatedBytes: 99}),
			node("n4", membership.StatusLeft, snap(64, 1<<40, []resources.Disk{diskA}, []resources.NIC{nicA}), api.Pool{DonatedBytes: 99}),
			node("n5", membership.StatusLeaving, snap(64, 1<<40, nil, nil), api.Pool{}),
			node("n6", membership.StatusAlive, nil, api.Pool{}),
		}, api.Totals{Nodes: 2, CPUs: 6, MemTotalBytes: 1500, MemFreeBytes: 750, PoolDonated: 15, PoolUsed: 3,
			DiskTotalBytes: 11000, DiskFreeBytes: 10400, Disks: 3, NICs: 3, Load1: 1, Procs: 200}},
		{"only nodes that do not count", []api.Node{
			node("n3", membership.StatusFailed, snap(64, 1<<40, []resources.Disk{diskA}, nil), api.Pool{}),
			node("n6", membership.StatusAlive, nil, api.Pool{}),
		}, api.Totals{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := api.Sum(tt.nodes); got != tt.want {
				t.Errorf("Sum =\n %+v\nwant\n %+v", got, tt.want)
			}
		})
	}
}

func TestStatusOf(t *testing.T) {
	nodes := []api.Node{
		node("n1", membership.StatusAlive, snap(4, 1000, []resources.Disk{diskA, diskB}, []resources.NIC{nicA}), api.Pool{}),
		node("n2", membership.StatusSuspect, snap(2, 500, []resources.Disk{diskB}, []resources.NIC{nicB}), api.Pool{}),
		node("n3", membership.StatusFailed, snap(8, 1, []resources.Disk{diskA}, []resources.NIC{nicA}), api.Pool{}),
		node("n4", membership.StatusLeft, snap(8, 1, []resources.Disk{diskA}, nil), api.Pool{}),
		node("n5", membership.StatusAlive, nil, api.Pool{}),
		node("n6", membership.StatusFailed, nil, api.Pool{}),
	}
	nr := api.NodesResponse{ClusterID: "c1", Observer: "n1", Nodes: nodes, Totals: api.Sum(nodes)}
	s := api.StatusOf(nr)

	if s.ClusterID != "c1" || s.Observer != "n1" {
		t.Errorf("cluster %q observer %q", s.ClusterID, s.Observer)
	}
	if s.Totals != nr.Totals {
		t.Errorf("Totals = %+v, want the response's %+v", s.Totals, nr.Totals)
	}
	wantMembers := map[string]int{"alive": 2, "suspect": 1, "failed": 2, "left": 1}
	if !reflect.DeepEqual(s.Members, wantMembers) {
		t.Errorf("Members = %v, want %v", s.Members, wantMembers)
	}
	wantDisks := []api.NodeDisk{{Node: "n1", Disk: diskA}, {Node: "n1", Disk: diskB}, {Node: "n2", Disk: diskB}}
	if !reflect.DeepEqual(s.DiskList, wantDisks) {
		t.Errorf("DiskList = %+v, want %+v", s.DiskList, wantDisks)
	}
	wantNICs := []api.NodeNIC{{Node: "n1", NIC: nicA}, {Node: "n2", NIC: nicB}}
	if !reflect.DeepEqual(s.NICList, wantNICs) {
		t.Errorf("NICList = %+v, want %+v", s.NICList, wantNICs)
	}
	if s.Disks != len(s.DiskList) || s.NICs != len(s.NICList) {
		t.Errorf("totals say %d disks %d NICs, lists have %d and %d", s.Disks, s.NICs, len(s.DiskList), len(s.NICList))
	}
}

func TestStatusOfEmptyEncodesLists(t *testing.T) {
	s := api.StatusOf(api.NodesResponse{})
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"disk_list":[]`, `"nic_list":[]`, `"members":{}`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("JSON %s lacks %s (clients expect lists, not null)", b, want)
		}
	}
}

func TestNewClientAddresses(t *testing.T) {
	tlsCfg := &tls.Config{}
	tests := []struct {
		addr string
		tls  *tls.Config
		ok   bool
	}{
		{"unix:///var/lib/onebox/agent.sock", nil, true},
		{"unix://relative.sock", nil, true},
		{api.DefaultAgent, nil, true},
		{"unix://", nil, false},
		{"https://10.0.0.1:7947", tlsCfg, true},
		{"https://[fd00::1]:7947", tlsCfg, true},
		{"https://10.0.0.1:7947", nil, false},
		{"https://", tlsCfg, false},
		{"https://:7947/x%zz", tlsCfg, false},
		{"http://10.0.0.1:7947", tlsCfg, false},
		{"tcp://10.0.0.1:7947", tlsCfg, false},
		{"10.0.0.1:7947", tlsCfg, false},
		{"/var/lib/onebox/agent.sock", nil, false},
		{"", nil, false},
		{"UNIX:///x.sock", nil, false},
	}
	for _, tt := range tests {
		c, err := api.NewClient(tt.addr, tt.tls)
		if (err == nil) != tt.ok {
			t.Errorf("NewClient(%q, tls=%v) = %v, want ok=%v", tt.addr, tt.tls != nil, err, tt.ok)
		}
		if err == nil && c.HTTPClient() == nil {
			t.Errorf("NewClient(%q) has no HTTP client", tt.addr)
		}
		if err != nil && c != nil {
			t.Errorf("NewClient(%q) returned a client with its error", tt.addr)
		}
	}
}

// serveUnix serves h on a unix socket in a temp dir and returns its address.
func serveUnix(t *testing.T, h http.Handler) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "a.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return "unix://" + path
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func TestClientOverUnixSocket(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+api.PathSelf, func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, api.NodeInfo{Name: "n1", ClusterID: "c1", Pool: api.Pool{DonatedBytes: 42}})
	})
	mux.HandleFunc("GET "+api.PathNodes, func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, api.NodesResponse{ClusterID: "c1", Nodes: []api.Node{node("n1", membership.StatusAlive, nil, api.Pool{})}, Totals: api.Totals{CPUs: 3}})
	})
	mux.HandleFunc("GET "+api.PathStatus, func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 503, api.ErrorBody{Error: "not ready"})
	})
	mux.HandleFunc("GET /plain-error", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "boom", 500)
	})
	mux.HandleFunc("GET /garbage", func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte("{not json"))
	})
	c, err := api.NewClient(serveUnix(t, mux), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	self, err := c.Self(ctx)
	if err != nil || self.Name != "n1" || self.Pool.DonatedBytes != 42 {
		t.Errorf("Self = %+v, %v", self, err)
	}
	nr, err := c.Nodes(ctx)
	if err != nil || nr.ClusterID != "c1" || len(nr.Nodes) != 1 || nr.Nodes[0].Name != "n1" || nr.Totals.CPUs != 3 {
		t.Errorf("Nodes = %+v, %v", nr, err)
	}
	if _, err := c.Status(ctx); err == nil || err.Error() != "agent: not ready" {
		t.Errorf("Status error = %v, want the agent's message", err)
	}
	var v map[string]any
	if err := c.Get(ctx, "/plain-error", &v); err == nil || !strings.Contains(err.Error(), "HTTP 500") {
		t.Errorf("plain error = %v, want HTTP 500", err)
	}
	if err := c.Get(ctx, "/garbage", &v); err == nil || !strings.Contains(err.Error(), "decode") {
		t.Errorf("garbage body error = %v, want a decode error", err)
	}
	if err := c.Get(ctx, "/missing", &v); err == nil || !strings.Contains(err.Error(), "404") {
		t.Errorf("missing path error = %v, want HTTP 404", err)
	}
}

func TestClientUnreachable(t *testing.T) {
	c, err := api.NewClient("unix://"+filepath.Join(t.TempDir(), "none.sock"), nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.Self(context.Background())
	if err == nil || !strings.Contains(err.Error(), "cannot reach the onebox agent") {
		t.Errorf("Self on a missing socket = %v", err)
	}
}

func TestClientOverMutualTLS(t *testing.T) {
	id, err := identity.Init(t.TempDir(), "n1", []net.IP{net.ParseIP("127.0.0.1")})
	if err != nil {
		t.Fatal(err)
	}
	other, err := identity.Init(t.TempDir(), "x1", nil)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", id.ServerTLS())
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, api.NodeInfo{Name: "n1"})
	})}
	go srv.Serve(ln)
	defer srv.Close()
	addr := "https://" + ln.Addr().String()

	c, err := api.NewClient(addr+"/ignored/path", id.ClientTLS())
	if err != nil {
		t.Fatal(err)
	}
	defer c.HTTPClient().CloseIdleConnections()
	if self, err := c.Self(context.Background()); err != nil || self.Name != "n1" {
		t.Errorf("member Self = %+v, %v", self, err)
	}

	oc, err := api.NewClient(addr, other.ClientTLS())
	if err != nil {
		t.Fatal(err)
	}
	defer oc.HTTPClient().CloseIdleConnections()
	if _, err := oc.Self(context.Background()); err == nil {
		t.Error("a member of another cluster got an answer")
	}
}
