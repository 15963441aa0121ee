package fusefs

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/onebox-project/onebox/cfs/client"
	"github.com/onebox-project/onebox/cfs/server"
)

// Appends to one file through two mounts (two nodes) at once stay whole
// records. Through the page cache, a 29-byte write crossing a page
// boundary was sent as two requests, and the other mount's append landed
// between them.
func TestMountAppendsFromTwoMounts(t *testing.T) {
	needFUSE(t)
	export := t.TempDir()
	s, err := server.New([]server.Export{{Name: "x", Path: export}}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var mnts []string
	for i := range 2 {
		c := pipeClient(s)
		defer c.Close()
		mnt := filepath.Join(t.TempDir(), fmt.Sprint("mnt", i))
		m, err := New(Options{Mountpoint: mnt, Nodes: func() []string { return []string{"a"} }, Client: func(string) *client.Client { return c }})
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		mnts = append(mnts, filepath.Join(mnt, "a", "x", "f"))
	}
	if err := os.WriteFile(mnts[0], nil, 0o644); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i, name := range mnts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f, err := os.OpenFile(name, os.O_WRONLY|os.O_APPEND, 0)
			if err != nil {
				t.Error(err)
				return
			}
			defer f.Close()
			for j := range 300 {
				if _, err := fmt.Fprintf(f, "n%d %05d %s\n", i, j, strings.Repeat("r", 20)); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	b, err := os.ReadFile(filepath.Join(export, "f"))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	if len(lines) != 600 {
		t.Fatalf("%d records, want 600", len(lines))
	}
	for _, l := range lines {
		if len(l) != 29 {
			t.Fatalf("torn record %q", l)
		}
	}
}
