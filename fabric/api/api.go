// Package api defines the agent's control API, its JSON types and a client
// for it. The same HTTP API is served on the agent's local unix socket (for
// the CLI on that machine; access is the socket's file mode) and on the
// fabric port behind mutual TLS (for other members).
package api

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"syscall"
	"time"

	"github.com/onebox-project/onebox/fabric/membership"
	"github.com/onebox-project/onebox/fabric/resources"
)

// Paths of the API.
const (
	PathSelf    = "/v1/self"
	PathNodes   = "/v1/nodes"
	PathStatus  = "/v1/status"
	PathHealth  = "/v1/health"
	PathMetrics = "/metrics"
)

// Export is a directory an agent offers to the cluster namespace.
type Export struct {
	Name     string `json:"name"`
	Path     string `json:"path"`
	ReadOnly bool   `json:"read_only,omitempty"`
	// RootSquash: root on other members acts as nobody in this export.
	RootSquash bool `json:"root_squash,omitempty"`
}

// Pool is a node's share of the cluster memory pool.
type Pool struct {
	DonatedBytes uint64 `json:"donated_bytes"`
	UsedBytes    uint64 `json:"used_bytes"`
}

// NodeInfo is what a node reports about itself.
type NodeInfo struct {
	Name       string             `json:"name"`
	ClusterID  string             `json:"cluster_id"`
	Version    string             `json:"version"`
	FabricAddr string             `json:"fabric_addr"`
	GossipAddr string             `json:"gossip_addr"`
	Started    time.Time          `json:"started"`
	Resources  resources.Snapshot `json:"resources"`
	Pool       Pool               `json:"pool"`
	Exports    []Export           `json:"exports"`
}

// Node is one row of the cluster view: membership from gossip, details
// from the node itself (or the last details known, for a node that does
// not answer).
type Node struct {
	membership.Member
	Info *NodeInfo `json:"info,omitempty"`
	// Stale is set when Info could not be refreshed; InfoAge says how old it is.
	Stale   bool   `json:"stale,omitempty"`
	InfoAge string `json:"info_age,omitempty"`
	Error   string `json:"error,omitempty"`
}

// Totals are resources summed over the nodes that count (alive and suspect
// nodes with details).
type Totals struct {
	Nodes          int     `json:"nodes"`
	CPUs           int     `json:"cpus"`
	MemTotalBytes  uint64  `json:"mem_total_bytes"`
	MemFreeBytes   uint64  `json:"mem_free_bytes"`
	PoolDonated    uint64  `json:"pool_donated_bytes"`
	PoolUsed       uint64  `json:"pool_used_bytes"`
	DiskTotalBytes uint64  `json:"disk_total_bytes"`
	DiskFreeBytes  uint64  `json:"disk_free_bytes"`
	Disks          int     `json:"disks"`
	NICs           int     `json:"nics"`
	Load1          float64 `json:"load1"`
	Procs          int     `json:"procs"`
}

// NodesResponse is the answer of PathNodes.
type NodesResponse struct {
	ClusterID string `json:"cluster_id"`
	Observer  string `json:"observer"` // the node that answered
	Nodes     []Node `json:"nodes"`
	Totals    Totals `json:"totals"`
}

// Status is the cluster seen as one machine.
type Status struct {
	ClusterID string         `json:"cluster_id"`
	Observer  string         `json:"observer"`
	Members   map[string]int `json:"members"` // count by status
	Totals
	DiskList []NodeDisk `json:"disk_list"`
	NICList  []NodeNIC  `json:"nic_list"`
}

// NodeDisk is a disk of the one big machine, named by node.
type NodeDisk struct {
	Node string `json:"node"`
	resources.Disk
}

// NodeNIC is a network interface of the one big machine, named by node.
type NodeNIC struct {
	Node string `json:"node"`
	resources.NIC
}

// Counts reports whether a node's resources count in the totals.
func (n Node) Counts() bool {
	return n.Info != nil && (n.Status == membership.StatusAlive || n.Status == membership.StatusSuspect)
}

// Sum computes totals over nodes. It is the one place where the cluster's
// resources are added up, so 'nodes' and 'status' always agree.
func Sum(nodes []Node) Totals {
	var t Totals
	for _, n := range nodes {
		if !n.Counts() {
			continue
		}
		r := n.Info.Resources
		t.Nodes++
		t.CPUs += r.CPUs
		t.MemTotalBytes += r.MemTotalBytes
		t.MemFreeBytes += r.MemFreeBytes
		t.PoolDonated += n.Info.Pool.DonatedBytes
		t.PoolUsed += n.Info.Pool.UsedBytes
		t.Load1 += r.Load1
		t.Procs += r.Procs
		t.NICs += len(r.NICs)
		t.Disks += len(r.Disks)
		for _, d := range r.Disks {
			t.DiskTotalBytes += d.TotalBytes
			t.DiskFreeBytes += d.FreeBytes
		}
	}
	return t
}

// StatusOf builds the one-machine view from the node list.
func StatusOf(nr NodesResponse) Status {
	s := Status{ClusterID: nr.ClusterID, Observer: nr.Observer, Members: map[string]int{}, Totals: nr.Totals,
		DiskList: []NodeDisk{}, NICList: []NodeNIC{}}
	for _, n := range nr.Nodes {
		s.Members[string(n.Status)]++
		if !n.Counts() {
			continue
		}
		for _, d := range n.Info.Resources.Disks {
			s.DiskList = append(s.DiskList, NodeDisk{Node: n.Name, Disk: d})
		}
		for _, c := range n.Info.Resources.NICs {
			s.NICList = append(s.NICList, NodeNIC{Node: n.Name, NIC: c})
		}
	}
	return s
}

// ErrorBody is the JSON body of every non-2xx answer.
type ErrorBody struct {
	Error string `json:"error"`
}

// Client talks to an agent's API.
type Client struct {
	base string
	hc   *http.Client
}

// DefaultAgent is where the CLI looks for the local agent when neither
// --agent nor ONEBOX_AGENT says otherwise.
const DefaultAgent = "unix:///var/lib/onebox/agent.sock"

// NewClient returns a client for an agent address:
//
//	unix:///path/agent.sock   the agent's local socket
//	https://host:port         a member's fabric port (needs tlsCfg with a member certificate)
func NewClient(addr string, tlsCfg *tls.Config) (*Client, error) {
	switch {
	case strings.HasPrefix(addr, "unix://"):
		path := strings.TrimPrefix(addr, "unix://")
		if path == "" {
			return nil, errors.New("api: empty unix socket path in agent address")
		}
		tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}}
		return &Client{base: "http://agent", hc: &http.Client{Transport: tr, Timeout: 15 * time.Second}}, nil
	case strings.HasPrefix(addr, "https://"):
		if tlsCfg == nil {
			return nil, errors.New("api: an https agent address needs a member certificate (run the CLI with --data-dir of a member)")
		}
		u, err := url.Parse(addr)
		if err != nil || u.Host == "" {
			return nil, fmt.Errorf("api: bad agent address %q", addr)
		}
		tr := &http.Transport{TLSClientConfig: tlsCfg, ForceAttemptHTTP2: false}
		return &Client{base: "https://" + u.Host, hc: &http.Client{Transport: tr, Timeout: 15 * time.Second}}, nil
	default:
		return nil, fmt.Errorf("api: agent address %q must start with unix:// or https://", addr)
	}
}

// HTTPClient exposes the underlying client for fan-out with custom timeouts.
func (c *Client) HTTPClient() *http.Client { return c.hc }

// Get fetches path into v.
func (c *Client) Get(ctx context.Context, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+path, nil)
	if err != nil {
		return err
	}
	resp, err := c.hc.Do(req)
	if errors.Is(err, syscall.EACCES) {
		return fmt.Errorf("cannot reach the onebox agent: %w (the agent's socket is for root only: run as root, e.g. with sudo)", err)
	}
	if err != nil {
		return fmt.Errorf("cannot reach the onebox agent: %w (is 'onebox agent' running? set --agent or ONEBOX_AGENT)", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("api: read %s: %w", path, err)
	}
	if resp.StatusCode/100 != 2 {
		var eb ErrorBody
		if json.Unmarshal(body, &eb) == nil && eb.Error != "" {
			return fmt.Errorf("agent: %s", eb.Error)
		}
		return fmt.Errorf("agent: %s: HTTP %d", path, resp.StatusCode)
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("api: decode %s: %w", path, err)
	}
	return nil
}

// Nodes returns the cluster view.
func (c *Client) Nodes(ctx context.Context) (NodesResponse, error) {
	var r NodesResponse
	return r, c.Get(ctx, PathNodes, &r)
}

// Status returns the one-machine view.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var s Status
	return s, c.Get(ctx, PathStatus, &s)
}

// Self returns the agent's own details.
func (c *Client) Self(ctx context.Context) (NodeInfo, error) {
	var n NodeInfo
	return n, c.Get(ctx, PathSelf, &n)
}
