package balance

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/onebox-project/onebox/fabric/pki"
	"github.com/onebox-project/onebox/proc/manager"
)

// Report is a node's balancer state, as served at GET /v1/balance?scope=node
// to the CLI and to other members (who read Load and CPUs from it).
type Report struct {
	Node string `json:"node"`
	CPUs int    `json:"cpus"`
	// Load is the smoothed number of runnable threads of the node's
	// onebox-managed processes.
	Load float64 `json:"load"`
	// Cordoned: no new or moved process may be placed on the node.
	Cordoned bool `json:"cordoned"`
	// Balancing: the node's agent moves its processes by itself (off with
	// 'onebox agent --no-balance').
	Balancing bool `json:"balancing"`
	// Migrating is the process being moved off the node now, if any.
	Migrating string       `json:"migrating,omitempty"`
	Procs     []ProcReport `json:"procs"`
	// Recent are the node's last moves (and failed attempts), newest last.
	Recent  []MoveRecord `json:"recent"`
	Sampled time.Time    `json:"sampled"`
}

// PerCPU is the load per CPU.
func (r Report) PerCPU() float64 { return NodeLoad{Name: r.Node, CPUs: r.CPUs, Load: r.Load}.PerCPU() }

// ProcReport is one process of a Report.
type ProcReport struct {
	GID      string  `json:"gid"`
	Demand   float64 `json:"demand"` // smoothed runnable threads
	RSSBytes uint64  `json:"rss_bytes"`
	Balance  bool    `json:"balance"`
	// StaysUntil: the balancer leaves the process where it is until then
	// (settling, cooling down after a move, or after a failed one).
	StaysUntil *time.Time `json:"stays_until,omitempty"`
}

// MoveRecord is one migration the balancer or a drain made or tried.
type MoveRecord struct {
	GID     string    `json:"gid"`
	From    string    `json:"from"`
	To      string    `json:"to"`
	Reason  string    `json:"reason"`
	At      time.Time `json:"at"`
	Seconds float64   `json:"seconds"`
	Error   string    `json:"error,omitempty"`
}

// ClusterReport is every node's Report, as GET /v1/balance answers.
type ClusterReport struct {
	Observer    string              `json:"observer"`
	Nodes       []Report            `json:"nodes"`
	Unreachable []manager.NodeError `json:"unreachable,omitempty"`
}

// Bounds of a decoded report: far above any real node, low enough that a
// member cannot make another hold much memory.
const (
	MaxReportBytes = 8 << 20
	maxProcs       = 100000
	maxRecent      = 1000
	maxCPUs        = 1 << 16
	maxLoad        = 1e7
	maxText        = 4096
)

// DecodeReport reads one Report from another member (network input: at
// most MaxReportBytes, every value checked). Fields it does not know are
// ignored: a report only informs this node's balancer, and a member one
// version ahead in a rolling upgrade must not stop balancing.
func DecodeReport(r io.Reader) (Report, error) {
	var rep Report
	dec := json.NewDecoder(io.LimitReader(r, MaxReportBytes))
	if err := dec.Decode(&rep); err != nil {
		return Report{}, fmt.Errorf("balance: bad report: %w", err)
	}
	if err := rep.Check(); err != nil {
		return Report{}, err
	}
	return rep, nil
}

// Check validates a report's values.
func (r Report) Check() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("balance: bad report: "+format, args...)
	}
	if err := pki.ValidNodeName(r.Node); err != nil {
		return bad("node: %v", err)
	}
	if r.CPUs < 1 || r.CPUs > maxCPUs {
		return bad("%d CPUs", r.CPUs)
	}
	if !finite(r.Load) || r.Load < 0 || r.Load > maxLoad {
		return bad("load %v", r.Load)
	}
	if r.Migrating != "" && !manager.ValidGID(r.Migrating) {
		return bad("migrating %q is not a process id", r.Migrating)
	}
	if len(r.Procs) > maxProcs || len(r.Recent) > maxRecent {
		return bad("%d processes, %d moves", len(r.Procs), len(r.Recent))
	}
	for _, p := range r.Procs {
		if !manager.ValidGID(p.GID) {
			return bad("process id %q", p.GID)
		}
		if !finite(p.Demand) || p.Demand < 0 || p.Demand > maxLoad {
			return bad("process %s demand %v", p.GID, p.Demand)
		}
	}
	for _, m := range r.Recent {
		if !manager.ValidGID(m.GID) || len(m.From) > 64 || len(m.To) > 64 || len(m.Reason) > maxText || len(m.Error) > maxText {
			return bad("move record of %q", m.GID)
		}
		if !finite(m.Seconds) {
			return bad("move record of %s: seconds %v", m.GID, m.Seconds)
		}
	}
	return nil
}

// Stat is what the balancer reads of /proc/PID/stat (or of a thread's
// /proc/PID/task/TID/stat).
type Stat struct {
	State   byte // R (running or runnable), S, D, Z, T, ...
	PGID    int
	Threads int
}

// ParseStat parses a /proc/PID/stat line. The command name may hold
// spaces and parentheses, so fields are counted from the last ')'.
func ParseStat(s string) (Stat, error) {
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return Stat{}, errors.New("balance: malformed stat: no ')'")
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state), f[2] field 5 (pgrp), f[17] field 20 (num_threads).
	if len(f) < 18 || len(f[0]) != 1 {
		return Stat{}, errors.New("balance: malformed stat: too few fields")
	}
	pgid, err := strconv.Atoi(f[2])
	if err != nil || pgid < 0 {
		return Stat{}, fmt.Errorf("balance: malformed stat: process group %q", f[2])
	}
	threads, err := strconv.Atoi(f[17])
	if err != nil || threads < 0 {
		return Stat{}, fmt.Errorf("balance: malformed stat: threads %q", f[17])
	}
	return Stat{State: f[0][0], PGID: pgid, Threads: threads}, nil
}
