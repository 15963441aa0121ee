package agent

import (
	"bytes"
	"fmt"
	"math"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	loadbal "github.com/onebox-project/onebox/proc/balance"
)

func TestBalanceConfigValidate(t *testing.T) {
	tests := []struct {
		name string
		c    BalanceConfig
		ok   bool
	}{
		{"defaults", BalanceConfig{}, true},
		{"off", BalanceConfig{NoBalance: true}, true},
		{"tuned", BalanceConfig{BalanceThreshold: 1.5, BalanceInterval: 500 * time.Millisecond, BalanceCooldown: time.Minute}, true},
		{"negative threshold", BalanceConfig{BalanceThreshold: -0.1}, false},
		{"NaN threshold", BalanceConfig{BalanceThreshold: math.NaN()}, false},
		{"threshold above 100", BalanceConfig{BalanceThreshold: 101}, false},
		{"negative interval", BalanceConfig{BalanceInterval: -time.Second}, false},
		{"interval too short", BalanceConfig{BalanceInterval: time.Millisecond}, false},
		{"negative cooldown", BalanceConfig{BalanceCooldown: -time.Second}, false},
	}
	for _, tt := range tests {
		if err := tt.c.validate(); (err == nil) != tt.ok {
			t.Errorf("%s: validate() = %v, want ok %v", tt.name, err, tt.ok)
		}
	}
}

// countRunnable finds a real busy process group's runnable threads and
// not an idle one's.
func TestCountRunnable(t *testing.T) {
	busy := exec.Command("sh", "-c", "while :; do :; done")
	idle := exec.Command("sleep", "30")
	for _, c := range []*exec.Cmd{busy, idle} {
		c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { c.Process.Kill(); c.Wait() }()
	}
	// A process that is still starting (fork, exec, loading) is runnable:
	// sample once sleep is asleep, as it is for the rest of its life.
	for deadline := time.Now().Add(10 * time.Second); ; {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", idle.Process.Pid))
		if err != nil {
			t.Fatal(err)
		}
		if i := bytes.LastIndexByte(b, ')'); i > 0 && len(b) > i+2 && b[i+2] == 'S' {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("sleep never went to sleep: %s", b)
		}
		time.Sleep(10 * time.Millisecond)
	}
	var busyR, idleR int
	const rounds = 20
	for range rounds {
		groups := map[int]*loadbal.Sample{busy.Process.Pid: {}, idle.Process.Pid: {}}
		if err := countRunnable(groups); err != nil {
			t.Fatal(err)
		}
		busyR += groups[busy.Process.Pid].Runnable
		idleR += groups[idle.Process.Pid].Runnable
		time.Sleep(20 * time.Millisecond)
	}
	// A busy loop is runnable all the time (running or waiting for a CPU);
	// allow for samples taken while the kernel had it briefly elsewhere.
	if busyR < rounds*3/4 {
		t.Errorf("busy loop runnable in %d of %d samples", busyR, rounds)
	}
	if idleR != 0 {
		t.Errorf("sleep runnable in %d of %d samples", idleR, rounds)
	}
}
