package agent

import (
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
