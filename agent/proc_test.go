package agent

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/onebox-project/onebox/proc/manager"
)

func TestDedupe(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	code := 0
	run := func(gid, node, moving string) manager.Info {
		return manager.Info{GID: gid, Node: node, State: manager.StateRunning, Migrating: moving, Started: t0}
	}
	ended := func(gid, node string, at time.Time) manager.Info {
		return manager.Info{GID: gid, Node: node, State: manager.StateExited, ExitCode: &code, Started: at}
	}
	tests := []struct {
		name string
		in   []manager.Info
		want []string // node of each kept entry, in order
	}{
		{"distinct ids kept in order", []manager.Info{run("a", "n1", ""), run("b", "n2", "")}, []string{"n1", "n2"}},
		{"restored copy beats the frozen original", []manager.Info{run("a", "n1", "n2"), run("a", "n2", "")}, []string{"n2"}},
		{"frozen original listed last loses too", []manager.Info{run("a", "n2", ""), run("a", "n1", "n2")}, []string{"n2"}},
		{"running beats ended", []manager.Info{ended("a", "n1", t0), run("a", "n2", "n3")}, []string{"n2"}},
		{"two ended: the later start wins", []manager.Info{ended("a", "n1", t0), ended("a", "n2", t0.Add(time.Second))}, []string{"n2"}},
		{"others keep their place", []manager.Info{run("a", "n1", "n2"), run("b", "n3", ""), run("a", "n2", "")}, []string{"n2", "n3"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := dedupe(append([]manager.Info(nil), tc.in...))
			if len(got) != len(tc.want) {
				t.Fatalf("got %d entries %+v, want nodes %v", len(got), got, tc.want)
			}
			for i, g := range got {
				if g.Node != tc.want[i] {
					t.Fatalf("entry %d on %s, want %s (%+v)", i, g.Node, tc.want[i], got)
				}
			}
		})
	}
}

// A migration's images go to a tmpfs: DATA_DIR/proc/migrate if it is one
// (the full-disk test mounts a tiny one there), else the agent's own
// directory in /dev/shm; a checkpoint's stay on disk.
func TestImageDir(t *testing.T) {
	if !onTmpfs("/dev/shm") {
		t.Skip("/dev/shm is no tmpfs here")
	}
	data := t.TempDir()
	onDisk := filepath.Join(data, "proc", "migrate", "g0.in")
	shm := shmImagePrefix(data) + "g0.in"
	p := &procState{a: &Agent{cfg: Config{DataDir: data}}}
	dataTmpfs := onTmpfs(filepath.Join(data, "proc", "migrate"))
	for _, tc := range []struct {
		name     string
		inMemory bool
		want     string
	}{
		{"migration", true, map[bool]string{true: onDisk, false: shm}[dataTmpfs]},
		{"checkpoint", false, onDisk},
	} {
		if got := p.imageDir("g0.in", tc.inMemory); got != tc.want {
			t.Errorf("%s: %s, want %s", tc.name, got, tc.want)
		}
	}
	if shmImagePrefix(data) != shmImagePrefix(data+"/") || shmImagePrefix(data) == shmImagePrefix(data+"x") {
		t.Error("the /dev/shm names are not one set per data directory")
	}
	// An agent starting removes its predecessor's images, and anyone's
	// that are stale; not another live agent's.
	other := t.TempDir()
	mine, theirs, old := shm, shmImagePrefix(other)+"g1.out", shmImagePrefix(other)+"g2.out"
	for _, d := range []string{mine, theirs, old} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
		defer os.RemoveAll(d)
	}
	past := time.Now().Add(-shmStale - time.Minute)
	if err := os.Chtimes(old, past, past); err != nil {
		t.Fatal(err)
	}
	if err := removeStaleImages(data); err != nil {
		t.Fatal(err)
	}
	for d, want := range map[string]bool{mine: false, theirs: true, old: false} {
		if _, err := os.Stat(d); (err == nil) != want {
			t.Errorf("%s: exists %v, want %v", d, err == nil, want)
		}
	}
	// The nearest existing directory decides.
	if !onTmpfs("/dev/shm/no/such/dir") {
		t.Error("a missing directory under /dev/shm is not on a tmpfs")
	}
}
