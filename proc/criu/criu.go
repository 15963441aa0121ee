// Package criu finds a working CRIU binary and runs checkpoint/restore commands with it.
//
// CRIU older than 4.1 fails every command on recent kernels ("vdso: Unexpected rt vDSO area
// bounds"), so Find accepts only 4.1 or newer. scripts/install-criu.sh installs one into
// /opt/onebox/criu when the system has none.
package criu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// EnvVar names the environment variable that, when set, is the only CRIU binary Find considers.
const EnvVar = "ONEBOX_CRIU"

// DefaultPath is where scripts/install-criu.sh puts its wrapper around a private CRIU.
const DefaultPath = "/opt/onebox/criu/bin/criu"

// MinMajor and MinMinor are the oldest CRIU version that works on the kernels onebox runs on.
const (
	MinMajor = 4
	MinMinor = 1
)

// probeTimeout bounds `criu --version` while looking for a binary.
const probeTimeout = 10 * time.Second

// Binary is a CRIU executable that reported a usable version.
type Binary struct {
	Path    string // absolute path of the executable (possibly a wrapper script)
	Version string // as reported by `criu --version`, e.g. "4.1.1"
}

// Find returns the first usable CRIU: $ONEBOX_CRIU if set (and then only it), else DefaultPath,
// else criu on PATH. A binary is usable if `criu --version` reports 4.1 or newer.
func Find() (Binary, error) {
	var candidates []string
	if p := os.Getenv(EnvVar); p != "" {
		candidates = []string{p}
	} else {
		candidates = append(candidates, DefaultPath)
		if p, err := exec.LookPath("criu"); err == nil {
			candidates = append(candidates, p)
		}
	}
	var errs []error
	for _, p := range candidates {
		if _, err := os.Stat(p); err != nil {
			if os.Getenv(EnvVar) != "" {
				errs = append(errs, fmt.Errorf("%s=%s: %w", EnvVar, p, err))
			}
			continue
		}
		b, err := probe(p)
		if err == nil {
			return b, nil
		}
		errs = append(errs, err)
	}
	if len(errs) == 0 {
		return Binary{}, fmt.Errorf("criu: no CRIU found (looked at %s and PATH); run scripts/install-criu.sh", DefaultPath)
	}
	return Binary{}, fmt.Errorf("criu: no usable CRIU: %w", errors.Join(errs...))
}

func probe(path string) (Binary, error) {
	ctx, cancel := context.WithTimeout(context.Background(), probeTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, "--version").CombinedOutput()
	if err != nil {
		return Binary{}, fmt.Errorf("%s --version: %w: %s", path, err, firstLine(out))
	}
	v, major, minor, ok := parseVersion(string(out))
	if !ok {
		return Binary{}, fmt.Errorf("%s --version: no version in output %q", path, firstLine(out))
	}
	if major < MinMajor || (major == MinMajor && minor < MinMinor) {
		return Binary{}, fmt.Errorf("%s is CRIU %s; need >= %d.%d (older versions fail on this kernel: \"vdso: Unexpected rt vDSO area bounds\"); run scripts/install-criu.sh",
			path, v, MinMajor, MinMinor)
	}
	return Binary{Path: path, Version: v}, nil
}

var versionRE = regexp.MustCompile(`(?m)^Version:\s*(\d+)\.(\d+)(\.\d+)*`)

// parseVersion extracts the version from `criu --version` output ("Version: 4.1.1").
func parseVersion(out string) (v string, major, minor int, ok bool) {
	m := versionRE.FindStringSubmatch(out)
	if m == nil {
		return "", 0, 0, false
	}
	major, err1 := strconv.Atoi(m[1])
	minor, err2 := strconv.Atoi(m[2])
	if err1 != nil || err2 != nil {
		return "", 0, 0, false
	}
	return strings.TrimSpace(strings.TrimPrefix(m[0], "Version:")), major, minor, true
}

// Command returns a command running this CRIU with args, killed when ctx ends.
func (b Binary) Command(ctx context.Context, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, b.Path, args...)
}

// Check runs `criu check` and returns an error with CRIU's output unless it passes.
func (b Binary) Check(ctx context.Context) error {
	out, err := b.Command(ctx, "check").CombinedOutput()
	if err != nil {
		return fmt.Errorf("criu check (%s, %s): %w: %s", b.Path, b.Version, err, bytes.TrimSpace(out))
	}
	return nil
}

func firstLine(b []byte) string {
	s, _, _ := strings.Cut(strings.TrimSpace(string(b)), "\n")
	return s
}
