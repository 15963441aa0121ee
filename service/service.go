// Package service defines exposed services, onebox's counterpart of
// OpenSSI's cluster virtual IP: a port of one node (the service address)
// whose connections are carried over the fabric to listeners on other
// nodes (the targets), balanced across them. It holds what the agent and
// the CLI share: target syntax, the definition an agent persists, and the
// API's request and status types. The data path is in service/proxy, the
// balancer and health checks in service/balance, the fabric header in
// service/wire.
package service

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/onebox-project/onebox/service/balance"
)

// Target is where a service's connections go: a port on a node, or a port
// of a process known by its global id (followed wherever it runs now).
type Target struct {
	Node string `json:"node,omitempty"`
	GID  string `json:"gid,omitempty"`
	Port int    `json:"port"`
}

func (t Target) String() string {
	who := t.Node
	if t.GID != "" {
		who = t.GID
	}
	return who + ":" + strconv.Itoa(t.Port)
}

// IsGID reports whether s has the form of a global process id (g and 12
// hex digits, as 'onebox ps' prints them). A node named like that would be
// read as a process id.
func IsGID(s string) bool {
	if len(s) != 13 || s[0] != 'g' {
		return false
	}
	for _, c := range s[1:] {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// ParseTarget reads NODE:PORT or GID:PORT.
func ParseTarget(s string) (Target, error) {
	who, p, ok := strings.Cut(strings.TrimSpace(s), ":")
	if !ok || who == "" || p == "" {
		return Target{}, fmt.Errorf("target %q: want NODE:PORT or GID:PORT (a node name from 'onebox nodes' or a process id from 'onebox ps')", s)
	}
	port, err := ParsePort(p)
	if err != nil {
		return Target{}, fmt.Errorf("target %q: %w", s, err)
	}
	if IsGID(who) {
		return Target{GID: who, Port: port}, nil
	}
	if strings.ContainsAny(who, "/: \t\x00") || len(who) > 63 {
		return Target{}, fmt.Errorf("target %q: %q is not a node name or a process id", s, who)
	}
	return Target{Node: who, Port: port}, nil
}

// ParsePort reads a TCP port, 1 to 65535.
func ParsePort(s string) (int, error) {
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > 65535 {
		return 0, fmt.Errorf("port %q: want a number from 1 to 65535", s)
	}
	return n, nil
}

// ValidName checks a service name: 1 to 63 letters, digits, '.', '_' or
// '-', starting with a letter or digit (it appears in URLs and metrics).
func ValidName(name string) error {
	if name == "" || len(name) > 63 {
		return fmt.Errorf("service name %q: want 1 to 63 characters", name)
	}
	for i, c := range name {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || (i > 0 && (c == '.' || c == '_' || c == '-'))
		if !ok {
			return fmt.Errorf("service name %q: use letters, digits, '.', '_' and '-', starting with a letter or digit", name)
		}
	}
	return nil
}

// DefaultName is the name of a service created without --name.
func DefaultName(node string, port int) string { return node + "-" + strconv.Itoa(port) }

// Spec defines one service; the exposing node keeps its specs in a file
// of its data directory, so they survive its restart.
type Spec struct {
	Name    string         `json:"name"`
	Node    string         `json:"node"` // where the service address listens
	Port    int            `json:"port"`
	Policy  balance.Policy `json:"policy"`
	Targets []Target       `json:"targets"`
}

// Validate checks a spec's fields (not whether nodes or processes exist).
func (s Spec) Validate() error {
	var errs []error
	if err := ValidName(s.Name); err != nil {
		errs = append(errs, err)
	}
	if s.Node == "" {
		errs = append(errs, errors.New("no node given for the service address: use --node"))
	}
	if s.Port < 1 || s.Port > 65535 {
		errs = append(errs, fmt.Errorf("port %d: want 1 to 65535", s.Port))
	}
	if _, err := balance.ParsePolicy(string(s.Policy)); err != nil {
		errs = append(errs, err)
	}
	if len(s.Targets) == 0 {
		errs = append(errs, errors.New("no target: give --to NODE:PORT or --to GID:PORT"))
	}
	for _, t := range s.Targets {
		if (t.Node == "") == (t.GID == "") || t.Port < 1 || t.Port > 65535 {
			errs = append(errs, fmt.Errorf("target %+v is not NODE:PORT or GID:PORT", t))
		}
	}
	return errors.Join(errs...)
}

// ExposeRequest is the body of POST /v1/services: create a service, or
// add targets to an existing one of that name. Node and Port may be left
// out when adding targets to an existing service.
type ExposeRequest struct {
	Name    string   `json:"name"`
	Node    string   `json:"node"`
	Port    int      `json:"port"`
	Policy  string   `json:"policy,omitempty"`
	Targets []string `json:"targets"` // NODE:PORT or GID:PORT
}

// TargetStatus is one target of a service as its exposing node sees it.
type TargetStatus struct {
	balance.State
	// Node runs the target now (for a GID target, the node it was last
	// found on; "" if not found).
	Node string `json:"node"`
}

// Status is one service as its exposing node reports it.
type Status struct {
	Spec
	Listen   string         `json:"listen"`          // the socket address the node listens on
	Address  string         `json:"address"`         // where clients connect (the node's address when it listens on all)
	Error    string         `json:"error,omitempty"` // why it does not listen (e.g. the port is taken)
	State    []TargetStatus `json:"target_status"`
	Healthy  int            `json:"healthy"` // targets in rotation
	Active   int64          `json:"active"`  // connections open now
	Total    int64          `json:"total"`   // connections carried
	Failed   int64          `json:"failed"`  // client connections no target took
	BytesIn  int64          `json:"bytes_in"`
	BytesOut int64          `json:"bytes_out"`
}

// NodeError says why a node's services are missing from a list.
type NodeError struct {
	Node  string `json:"node"`
	Error string `json:"error"`
}

// List is the answer of GET /v1/services.
type List struct {
	Observer    string      `json:"observer"`
	Services    []Status    `json:"services"`
	Unreachable []NodeError `json:"unreachable,omitempty"`
}

// Find returns the service of that name.
func (l List) Find(name string) (Status, bool) {
	for _, s := range l.Services {
		if s.Name == name {
			return s, true
		}
	}
	return Status{}, false
}

// Load reads the specs kept in path; a missing file holds none.
func Load(path string) ([]Spec, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("service: %w", err)
	}
	var specs []Spec
	if err := json.Unmarshal(b, &specs); err != nil {
		return nil, fmt.Errorf("service: %s: %w", path, err)
	}
	for _, s := range specs {
		if err := s.Validate(); err != nil {
			return nil, fmt.Errorf("service: %s: %w", path, err)
		}
	}
	return specs, nil
}

// Save writes specs to path atomically (a crash leaves the old or the new
// file, never half of one).
func Save(path string, specs []Spec) error {
	if specs == nil {
		specs = []Spec{}
	}
	b, err := json.MarshalIndent(specs, "", "  ")
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".services-*")
	if err != nil {
		return fmt.Errorf("service: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		return fmt.Errorf("service: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("service: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("service: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("service: %w", err)
	}
	return nil
}
