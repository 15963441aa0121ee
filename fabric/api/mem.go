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
