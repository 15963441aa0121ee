// Package shim carries the LD_PRELOAD shim of memory expansion
// (c/onebox_shim.c, in C: it runs inside unmodified programs, before and
// beside their own allocator) and builds it on the node that runs them.
//
// The C source is embedded in the onebox binary and compiled with the
// node's C compiler into the agent's data directory on first use, named by
// the hash of its source: the shim always speaks the wire protocol of the
// pager in the same binary (memory/pager/proto.go), and nothing has to be
// installed beside the binary.
package shim

import (
	"bytes"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
)

//go:embed c/onebox_shim.c
var source []byte

// Source returns the shim's C source.
func Source() []byte { return source }

var buildMu sync.Mutex

// Build compiles the shim into dir (created 0700 if missing) unless a build
// of the same source is there already, and returns the library's path.
func Build(dir string) (string, error) {
	buildMu.Lock()
	defer buildMu.Unlock()
	sum := sha256.Sum256(source)
	out := filepath.Join(dir, "onebox_shim-"+hex.EncodeToString(sum[:6])+".so")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	cc, err := exec.LookPath("cc")
	if err != nil {
		return "", fmt.Errorf("memory expansion needs a C compiler on this node to build its LD_PRELOAD shim (apt-get install gcc): %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("shim: %w", err)
	}
	tmp, err := os.MkdirTemp(dir, "build-")
	if err != nil {
		return "", fmt.Errorf("shim: %w", err)
	}
	defer os.RemoveAll(tmp)
	src := filepath.Join(tmp, "onebox_shim.c")
	if err := os.WriteFile(src, source, 0o600); err != nil {
		return "", fmt.Errorf("shim: %w", err)
	}
	lib := filepath.Join(tmp, "onebox_shim.so")
	cmd := exec.Command(cc, "-shared", "-fPIC", "-O2", "-Wall", "-o", lib, src, "-ldl", "-lpthread")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("shim: cc: %w: %s", err, stderr.String())
	}
	if err := os.Chmod(lib, 0o755); err != nil {
		return "", fmt.Errorf("shim: %w", err)
	}
	// Rename is atomic: a concurrent agent on the same data directory
	// (there is none: the directory is locked) or a crash never leaves a
	// half-written library under the final name.
	if err := os.Rename(lib, out); err != nil {
		return "", fmt.Errorf("shim: %w", err)
	}
	return out, nil
}
