package api

// PagerStats are one node's memory expansion counters: the programs its
// pager serves and their faults (filled by the agent's pager).
type PagerStats struct {
	Programs      int    `json:"programs"`       // programs running with --memory-expand
	ResidentBytes uint64 `json:"resident_bytes"` // their pages resident on this node
	PoolBytes     uint64 `json:"pool_bytes"`     // their pages held in the pool
	Faults        uint64 `json:"faults"`         // page faults served, all kinds
	RemoteFaults  uint64 `json:"remote_faults"`  // faults that fetched a page from the pool
	Evictions     uint64 `json:"evictions"`      // pages written out to the pool
}

// Memory pool endpoints of the control API.
const (
	PathMem      = "/v1/mem"       // the cluster's pool (asks every member)
	PathMemSelf  = "/v1/mem/self"  // this node's part
	PathMemProbe = "/v1/mem/probe" // POST, local socket only: write, check, drop a pattern
)

// MemNode is one node's part of the memory pool.
type MemNode struct {
	Name   string `json:"name"`
	Status string `json:"status"`          // membership status as the observer sees it
	Error  string `json:"error,omitempty"` // why the node's part is missing
	// As a server: the RAM it donates, what other nodes' pages use of it,
	// and what their owners reserved.
	DonatedBytes  uint64 `json:"donated_bytes"`
	UsedBytes     uint64 `json:"used_bytes"`
	ReservedBytes uint64 `json:"reserved_bytes"`
	// As an owner: its programs' pages in the pool (one copy counted),
	// those with fewer than Replicas copies or none, and the bytes it
	// re-replicated after node losses.
	Replicas             int               `json:"replicas"`
	OwnedPages           uint64            `json:"owned_pages"`
	UnderReplicatedPages uint64            `json:"under_replicated_pages"`
	LostPages            uint64            `json:"lost_pages"`
	RepairedBytes        uint64            `json:"repaired_bytes"`
	Placed               map[string]uint64 `json:"placed_bytes,omitempty"` // its copies' bytes by holding node
	Pager                PagerStats        `json:"pager"`
}

// MemResponse is 'onebox mem': the pool as a whole and per node.
type MemResponse struct {
	Observer             string     `json:"observer"`
	Replicas             int        `json:"replicas"`       // the observer's setting
	CapacityBytes        uint64     `json:"capacity_bytes"` // donated by the nodes that answered
	UsedBytes            uint64     `json:"used_bytes"`     // all copies
	ReservedBytes        uint64     `json:"reserved_bytes"`
	UnderReplicatedPages uint64     `json:"under_replicated_pages"`
	LostPages            uint64     `json:"lost_pages"`
	Pager                PagerStats `json:"pager"` // summed over nodes
	Nodes                []MemNode  `json:"nodes"`
}

// MemOf sums nodes into a MemResponse.
func MemOf(observer string, replicas int, nodes []MemNode) MemResponse {
	r := MemResponse{Observer: observer, Replicas: replicas, Nodes: nodes}
	for _, n := range nodes {
		if n.Error != "" || (n.Status != "alive" && n.Status != "suspect") {
			continue
		}
		r.CapacityBytes += n.DonatedBytes
		r.UsedBytes += n.UsedBytes
		r.ReservedBytes += n.ReservedBytes
		r.UnderReplicatedPages += n.UnderReplicatedPages
		r.LostPages += n.LostPages
		r.Pager.Programs += n.Pager.Programs
		r.Pager.ResidentBytes += n.Pager.ResidentBytes
		r.Pager.PoolBytes += n.Pager.PoolBytes
		r.Pager.Faults += n.Pager.Faults
		r.Pager.RemoteFaults += n.Pager.RemoteFaults
		r.Pager.Evictions += n.Pager.Evictions
	}
	return r
}

// MemProbe asks the local agent to exercise its pool: Op "store" writes
// Size bytes of a pattern derived from Seed under an owner named after
// the node and Name, "verify" reads them back and compares, "drop"
// forgets them, "reserve"/"release" account Size bytes of capacity.
type MemProbe struct {
	Op   string `json:"op"`
	Name string `json:"name"`
	Size uint64 `json:"size"`
	Seed uint64 `json:"seed"`
}

// MemProbeResult is the outcome of a MemProbe (Error empty on success;
// Full when the pool refused for lack of capacity).
type MemProbeResult struct {
	Op      string  `json:"op"`
	Owner   string  `json:"owner"`
	Bytes   uint64  `json:"bytes"`
	Seconds float64 `json:"seconds"`
	Error   string  `json:"error,omitempty"`
	Full    bool    `json:"full,omitempty"`
}
