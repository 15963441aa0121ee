package criu

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/onebox-project/onebox/internal/testenv"
)

// TestMain lets this test binary stand in for onebox's hidden KdatCommand.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == KdatCommand {
		os.Exit(KdatMain(os.Args[2:]))
	}
	os.Exit(m.Run())
}

// TestPrimeKdat: with no cache, PrimeKdat has real CRIU write one (in a
// mount namespace of its own, /run being no tmpfs here), CRIU then loads
// it, and a second call leaves the fresh cache alone.
func TestPrimeKdat(t *testing.T) {
	testenv.Need(t, os.Geteuid() == 0, "mount namespaces and /run need root")
	b, err := Find()
	testenv.NeedNoError(t, err, "no usable CRIU (run scripts/install-criu.sh)")
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// Set the host's cache aside (other CRIU runs only get slower
	// meanwhile) and put it back after.
	saved, err := os.ReadFile(KdatCache)
	had := err == nil
	if err := os.Remove(KdatCache); err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if had {
			if _, err := os.Stat(KdatCache); err != nil {
				os.WriteFile(KdatCache, saved, 0o600)
			}
		}
	})

	wrote, err := b.PrimeKdat(ctx, self)
	if err != nil || !wrote {
		t.Fatalf("PrimeKdat with no cache: wrote %v, err %v", wrote, err)
	}
	st, err := os.Stat(KdatCache)
	if err != nil || st.Size() == 0 || st.Mode().Perm() != 0o600 {
		t.Fatalf("cache after PrimeKdat: %v, %v", st, err)
	}
	if m, _ := filepath.Glob(filepath.Join(filepath.Dir(KdatCache), ".criu.kdat.onebox-*")); len(m) != 0 {
		t.Fatalf("temporary files left: %v", m)
	}
	// The helper's tmpfs stayed in its namespace.
	if mounts, err := os.ReadFile("/proc/self/mountinfo"); err == nil && strings.Contains(string(mounts), "onebox-kdat") {
		t.Fatal("the helper's tmpfs on /run leaked into this mount namespace")
	}
	log := filepath.Join(t.TempDir(), "check.log")
	if out, err := b.Command(ctx, "check", "-v4", "-o", log).CombinedOutput(); err != nil {
		t.Fatalf("criu check: %v: %s", err, out)
	}
	l, _ := os.ReadFile(log)
	if !strings.Contains(string(l), "Loaded kdat cache") {
		t.Fatalf("CRIU did not load the primed cache; its log:\n%s", l)
	}
	if wrote, err := b.PrimeKdat(ctx, self); err != nil || wrote {
		t.Fatalf("PrimeKdat with a fresh cache: wrote %v, err %v", wrote, err)
	}
}
