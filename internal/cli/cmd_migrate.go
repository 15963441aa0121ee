package cli

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/onebox-project/onebox/agent"
	"github.com/onebox-project/onebox/fabric/api"
	"github.com/onebox-project/onebox/proc/criu"
	"github.com/onebox-project/onebox/proc/manager"
	"github.com/onebox-project/onebox/proc/migrate"
	"github.com/onebox-project/onebox/testbed"
)

// migrateCommands are the migration verbs (issue 4): migrate, checkpoint,
// restore, and the hidden commands the agent runs itself as: the restore
// holder (proc/migrate.HolderMain) and CRIU's kernel cache writer
// (proc/criu.KdatMain).
func migrateCommands() []*cobra.Command {
	return []*cobra.Command{newMigrateCmd(), newCheckpointCmd(), newRestoreCmd(),
		hiddenMain(migrate.HolderCommand, migrate.HolderMain), hiddenMain(criu.KdatCommand, criu.KdatMain)}
}

// hiddenMain is a hidden subcommand the agent runs itself as (not for
// users): its arguments go to main unparsed, and its status is the exit
// status.
func hiddenMain(use string, main func([]string) int) *cobra.Command {
	return &cobra.Command{
		Use:                use,
		Hidden:             true,
		DisableFlagParsing: true,
		Args:               cobra.ArbitraryArgs,
		RunE: func(_ *cobra.Command, args []string) error {
			os.Exit(main(args))
			return nil
		},
	}
}

func newCheckpointCmd() *cobra.Command {
	var stop bool
	c := &cobra.Command{
		Use:   "checkpoint GID DIR",
		Short: "Save a running process to a directory (CRIU), to start it again later with 'onebox restore'",
		Long: `Save the complete state of a running process into DIR, an absolute path on the
node that runs it (a new or empty directory), with CRIU. The process goes on
running unless --stop. 'onebox restore DIR' starts it again later, on any node.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			format, err := outputFormat(cmd)
			if err != nil {
				return err
			}
			if !filepath.IsAbs(args[1]) {
				return usagef("DIR must be an absolute path (it is on the node that runs the process)")
			}
			q := url.Values{"dir": {args[1]}}
			if stop {
				q.Set("stop", "1")
			}
			var res agent.CheckpointResult
			if err := agentPost(cmd, "/v1/procs/"+url.PathEscape(args[0])+"/checkpoint?"+q.Encode(), 12*time.Minute, &res); err != nil {
				return err
			}
			if format == "json" {
				return writeJSON(cmd.OutOrStdout(), res)
			}
			state := "still running"
			if res.Stopped {
				state = "stopped"
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s checkpointed into %s on %s (%s, %.0f ms); the process is %s\n",
				res.GID, res.Dir, res.Node, size(uint64(res.Bytes)), res.DumpMS, state)
			return nil
		},
	}
	c.Flags().BoolVar(&stop, "stop", false, "end the process once it is saved")
	addOutputFlag(c)
	return c
}

func newRestoreCmd() *cobra.Command {
	var node string
	c := &cobra.Command{
		Use:   "restore DIR [--node NAME]",
		Short: "Start a process again from a checkpoint directory (of this node), on this node or NAME",
		Long: `Start a process saved by 'onebox checkpoint' again, from DIR on this node (the
agent's), on this node or on --node NAME. It runs detached with a new global id
(the original may still run); its output goes to a log file on that node, as
with 'onebox run --detach'.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			format, err := outputFormat(cmd)
			if err != nil {
				return err
			}
			dir, err := filepath.Abs(args[0])
			if err != nil {
				return err
			}
			q := url.Values{"dir": {dir}}
			if node != "" {
				q.Set("node", node)
			}
			var res agent.RestoreResult
			if err := agentPost(cmd, "/v1/procs/restore?"+q.Encode(), 5*time.Minute, &res); err != nil {
				return err
			}
			if format == "json" {
				return writeJSON(cmd.OutOrStdout(), res)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s\n", res.GID)
			return nil
		},
	}
	c.Flags().StringVar(&node, "node", "", "node to restore on (default: this one)")
	addOutputFlag(c)
	return c
}

func newMigrateCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "migrate GID NODE|home",
		Short: "Move a running process to another node (CRIU, post-copy); it keeps its id and its caller",
		Long: `Move a running process to another node, or back to the node where it was
started ("home"): it is checkpointed where it runs and restored on NODE, where
it goes on running with the same global id; the 'onebox run' that started it
keeps getting its output and sending its input and signals, and gets its exit
status. Its memory follows after the restore (post-copy), so the pause does
not grow with its size.

If anything fails before the process runs on NODE, it goes on running where it
was and the error says why. Processes that cannot move (an established TCP
connection, a device, memory expansion) are refused with the reason, which
'onebox ps' shows too.`,
		Args: cobra.ExactArgs(2),
		RunE: runMigrate,
	}
	addOutputFlag(c)
	return c
}

func runMigrate(cmd *cobra.Command, args []string) error {
	format, err := outputFormat(cmd)
	if err != nil {
		return err
	}
	var res migrate.Result
	if err := agentPost(cmd, "/v1/procs/"+url.PathEscape(args[0])+"/migrate?"+url.Values{"node": {args[1]}}.Encode(), 35*time.Minute, &res); err != nil {
		return err
	}
	if format == "json" {
		return writeJSON(cmd.OutOrStdout(), res)
	}
	w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "GID\tFROM\tTO\tPID\tDOWNTIME\tTOTAL\tIMAGES\tPAGES")
	pid := fmt.Sprint(res.PID)
	if res.PIDNS {
		pid += " (pidns)"
	}
	fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%.0f ms\t%.0f ms\t%s\t%s\n", res.GID, res.From, res.To, pid, res.DowntimeMS, res.TotalMS,
		size(uint64(res.ImageBytes)), size(uint64(res.PageBytes)))
	return w.Flush()
}

// agentPost makes a POST to the local agent's control socket and decodes
// the JSON answer into v (nil: ignored); an error answer becomes the error.
func agentPost(cmd *cobra.Command, path string, timeout time.Duration, v any) error {
	dial, err := agentDial(cmd)
	if err != nil {
		return err
	}
	hc := &http.Client{Timeout: timeout, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) { return dial(ctx) },
	}}
	req, err := http.NewRequestWithContext(cmd.Context(), http.MethodPost, "http://agent"+path, nil)
	if err != nil {
		return usagef("bad request %q", path)
	}
	resp, err := hc.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode/100 != 2 {
		var eb api.ErrorBody
		if json.Unmarshal(body, &eb) == nil && eb.Error != "" {
			return errors.New(eb.Error)
		}
		return fmt.Errorf("agent: HTTP %d", resp.StatusCode)
	}
	if v == nil {
		return nil
	}
	return json.Unmarshal(body, v)
}

// procBenchCommands are 'onebox bench' subcommands of the process space.
func procBenchCommands() []*cobra.Command { return []*cobra.Command{newBenchMigrateCmd()} }

// memHogC fills N MiB with a pattern and then sleeps: the process the
// migration benchmark moves.
const memHogC = `
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
	size_t n = (size_t)atol(argv[1]) << 20;
	unsigned char *p = malloc(n);
	unsigned long x = 88172645463325252UL;
	for (size_t i = 0; i < n; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; p[i] = (unsigned char)x; }
	for (;;) usleep(10000);
}
`

// BenchMigrateRow is one size of 'onebox bench migrate'.
type BenchMigrateRow struct {
	MiB           int     `json:"mib"`
	DowntimeMS    float64 `json:"downtime_ms"`     // onebox migrate: freeze to running on the target
	TotalMS       float64 `json:"total_ms"`        // onebox migrate: request to the last page
	CRIUDumpMS    float64 `json:"criu_dump_ms"`    // plain criu dump of the same kind of process
	CRIURestoreMS float64 `json:"criu_restore_ms"` // plain criu restore
	CRIUTotalMS   float64 `json:"criu_total_ms"`   // dump + restore: its downtime and total
	DowntimeRatio float64 `json:"downtime_ratio"`  // onebox downtime / plain criu downtime
	TotalRatio    float64 `json:"total_ratio"`     // onebox total / plain criu total
	FreezeMS      float64 `json:"freeze_ms"`       // onebox: lazy dump until images written
	BetweenMS     float64 `json:"between_ms"`      // onebox: images cross, criu lazy-pages starts, the answer comes back
	RestoreMS     float64 `json:"restore_ms"`      // onebox: restore on the target
	PIDNamespace  bool    `json:"pid_namespace"`   // onebox restored into a fresh PID namespace
}

func newBenchMigrateCmd() *cobra.Command {
	var sizes []int
	c := &cobra.Command{
		Use:   "migrate",
		Short: "Measure process migration (post-copy) against plain criu dump + restore",
		Long: `migrate starts a 2-node cluster on loopback (as 'onebox dev --nodes 2' does)
and, for each size, moves a process with that much resident memory (a C
program, built with cc, that fills it and sleeps) from n1 to n2 with
'onebox migrate', and checkpoints and restores a process of the same kind with
plain 'criu dump' + 'criu restore -d' (images on local disk, same machine, the
stop-and-copy baseline) in the same run. It prints the downtime (freeze until
the process runs again) and the total time of both and their ratios, and
onebox's downtime in three parts: freeze (CRIU's lazy dump, until the
non-memory images are written), between (the images cross, the target starts
criu lazy-pages, its answer comes back) and restore (the target's criu
restore). Needs root, CRIU (scripts/install-criu.sh) and cc.`,
		Example: `  onebox bench migrate
  onebox bench migrate --sizes 64,256,1024 -o json`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			format, err := outputFormat(cmd)
			if err != nil {
				return err
			}
			rows, err := benchMigrate(cmd.Context(), cmd.ErrOrStderr(), sizes)
			if err != nil {
				return err
			}
			if format == "json" {
				return writeJSON(cmd.OutOrStdout(), rows)
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "SIZE\tONEBOX DOWNTIME\tONEBOX TOTAL\tCRIU DUMP+RESTORE\tDOWNTIME RATIO\tTOTAL RATIO\t(FREEZE / BETWEEN / RESTORE)")
			for _, r := range rows {
				fmt.Fprintf(w, "%d MiB\t%.0f ms\t%.0f ms\t%.0f ms (%.0f + %.0f)\t%.2f\t%.2f\t%.0f / %.0f / %.0f ms\n", r.MiB, r.DowntimeMS, r.TotalMS,
					r.CRIUTotalMS, r.CRIUDumpMS, r.CRIURestoreMS, r.DowntimeRatio, r.TotalRatio, r.FreezeMS, r.BetweenMS, r.RestoreMS)
			}
			return w.Flush()
		},
	}
	c.Flags().IntSliceVar(&sizes, "sizes", []int{64, 256, 1024}, "resident sizes in MiB")
	addOutputFlag(c)
	return c
}

// benchMigrate runs the benchmark; progress goes to logw.
func benchMigrate(ctx context.Context, logw io.Writer, sizes []int) ([]BenchMigrateRow, error) {
	logf := func(format string, a ...any) { fmt.Fprintf(logw, "bench migrate: "+format+"\n", a...) }
	if os.Geteuid() != 0 {
		return nil, errors.New("bench migrate needs root (CRIU)")
	}
	for _, s := range sizes {
		if s < 1 || s > 64<<10 {
			return nil, usagef("--sizes: %d MiB is out of range 1..65536", s)
		}
	}
	b, err := criu.Find()
	if err != nil {
		return nil, err
	}
	cc, err := exec.LookPath("cc")
	if err != nil {
		return nil, errors.New("bench migrate builds its test program with cc: apt-get install gcc")
	}
	dir, err := os.MkdirTemp("", "obx-bench-migrate")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	prog := filepath.Join(dir, "memhog")
	if err := os.WriteFile(prog+".c", []byte(memHogC), 0o644); err != nil {
		return nil, err
	}
	if out, err := exec.CommandContext(ctx, cc, "-O1", "-o", prog, prog+".c").CombinedOutput(); err != nil {
		return nil, fmt.Errorf("cc: %v: %s", err, out)
	}
	// The plain restore's process is reparented here when criu exits.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return nil, err
	}
	logf("starting a 2-node cluster")
	cl, err := testbed.Start(ctx, testbed.Options{Nodes: 2, Dir: filepath.Join(dir, "cluster"), Logf: logf})
	if err != nil {
		return nil, err
	}
	defer cl.Close()
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	n1, n2 := cl.Nodes[0], cl.Nodes[1]
	obx := func(args ...string) ([]byte, error) {
		c := exec.CommandContext(ctx, self, append([]string{args[0], "--agent", n1.Agent()}, args[1:]...)...)
		var stderr strings.Builder
		c.Stderr = &stderr
		out, err := c.Output()
		if err != nil {
			return out, fmt.Errorf("onebox %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
		}
		return out, nil
	}
	var rows []BenchMigrateRow
	for _, mib := range sizes {
		row := BenchMigrateRow{MiB: mib}
		// Plain CRIU: dump, then restore, of the same program.
		p := exec.CommandContext(ctx, prog, strconv.Itoa(mib))
		p.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		if err := p.Start(); err != nil {
			return nil, err
		}
		if err := waitRSS(ctx, p.Process.Pid, uint64(mib)<<20); err != nil {
			p.Process.Kill()
			p.Wait()
			return nil, err
		}
		img := filepath.Join(dir, fmt.Sprintf("plain-%d", mib))
		if err := os.MkdirAll(img, 0o700); err != nil {
			return nil, err
		}
		t := time.Now()
		out, err := b.Command(ctx, "dump", "-t", strconv.Itoa(p.Process.Pid), "-D", img, "-o", "dump.log").CombinedOutput()
		row.CRIUDumpMS = benchMS(time.Since(t))
		p.Wait()
		if err != nil {
			return nil, fmt.Errorf("criu dump: %v: %s %s", err, out, criu.LogTail(filepath.Join(img, "dump.log")))
		}
		t = time.Now()
		out, err = b.Command(ctx, "restore", "-d", "-D", img, "-o", "restore.log").CombinedOutput()
		row.CRIURestoreMS = benchMS(time.Since(t))
		if err != nil {
			return nil, fmt.Errorf("criu restore: %v: %s %s", err, out, criu.LogTail(filepath.Join(img, "restore.log")))
		}
		_ = syscall.Kill(p.Process.Pid, syscall.SIGKILL)
		var ws syscall.WaitStatus
		_, _ = syscall.Wait4(p.Process.Pid, &ws, 0, nil)
		os.RemoveAll(img)
		row.CRIUTotalMS = row.CRIUDumpMS + row.CRIURestoreMS

		// onebox migrate n1 -> n2 of a detached run of the same program.
		out, err = obx("run", "--detach", "--node", n1.Name, "--", prog, strconv.Itoa(mib))
		if err != nil {
			return nil, err
		}
		gid := strings.TrimSpace(string(out))
		if err := waitGIDRSS(ctx, obx, gid, uint64(mib)<<20); err != nil {
			return nil, err
		}
		out, err = obx("migrate", "-o", "json", gid, n2.Name)
		if err != nil {
			return nil, err
		}
		var res migrate.Result
		if err := json.Unmarshal(out, &res); err != nil {
			return nil, err
		}
		_, _ = obx("kill", "-KILL", gid)
		row.DowntimeMS, row.TotalMS, row.FreezeMS, row.RestoreMS, row.PIDNamespace = res.DowntimeMS, res.TotalMS, res.FreezeMS, res.RestoreMS, res.PIDNS
		row.BetweenMS = max(0, row.DowntimeMS-row.FreezeMS-row.RestoreMS)
		row.DowntimeRatio = row.DowntimeMS / row.CRIUTotalMS
		row.TotalRatio = row.TotalMS / row.CRIUTotalMS
		logf("%d MiB: onebox downtime %.0f ms total %.0f ms; criu dump %.0f + restore %.0f ms", mib, row.DowntimeMS, row.TotalMS, row.CRIUDumpMS, row.CRIURestoreMS)
		rows = append(rows, row)
	}
	return rows, nil
}

func benchMS(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// waitRSS waits (at most 5 minutes) until pid has want bytes resident.
func waitRSS(ctx context.Context, pid int, want uint64) error {
	return pollFill(ctx, fmt.Sprintf("process %d", pid), 50*time.Millisecond, func() (bool, error) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/statm", pid))
		if err != nil {
			return false, fmt.Errorf("process %d: %w", pid, err)
		}
		f := strings.Fields(string(b))
		if len(f) > 1 {
			if pages, _ := strconv.ParseUint(f[1], 10, 64); pages*uint64(os.Getpagesize()) >= want {
				return true, nil
			}
		}
		return false, nil
	})
}

// waitGIDRSS waits until 'onebox ps' shows gid with want bytes resident.
func waitGIDRSS(ctx context.Context, obx func(...string) ([]byte, error), gid string, want uint64) error {
	return pollFill(ctx, "process "+gid, 100*time.Millisecond, func() (bool, error) {
		out, err := obx("ps", "-o", "json")
		if err != nil {
			return false, err
		}
		var l manager.ClusterList
		if err := json.Unmarshal(out, &l); err != nil {
			return false, err
		}
		for _, p := range l.Procs {
			if p.GID == gid && p.RSSBytes >= want {
				return true, nil
			}
		}
		return false, nil
	})
}

// pollFill polls filled every interval until it says true or fails, ctx
// ends, or 5 minutes pass (then the error says what did not fill).
func pollFill(ctx context.Context, what string, interval time.Duration, filled func() (bool, error)) error {
	deadline := time.Now().Add(5 * time.Minute)
	for time.Now().Before(deadline) {
		if ok, err := filled(); ok || err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(interval):
		}
	}
	return fmt.Errorf("%s did not fill its memory in 5 minutes", what)
}

// demoMigrate is the demo's migration step: a counter started on the
// first node moves to the second while its caller watches, with 'onebox
// ps' before and after. Skipped (with the reason) without root or CRIU.
func demoMigrate(ctx context.Context, out io.Writer, cl *testbed.Cluster) error {
	from, to := cl.Nodes[0], cl.Nodes[1]
	script := `i=0; while :; do i=$((i+1)); echo "count $i"; sleep 0.2; done`
	fmt.Fprintf(out, "\n==> Migration: onebox run --node %s -- sh -c '%s', then onebox migrate GID %s\n", from.Name, script, to.Name)
	if os.Geteuid() != 0 {
		fmt.Fprintln(out, "    skipped: migration needs root (CRIU)")
		return nil
	}
	if _, err := criu.Find(); err != nil {
		fmt.Fprintf(out, "    skipped: %v\n", err)
		return nil
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	obx := func(args ...string) *exec.Cmd {
		return exec.CommandContext(ctx, self, append([]string{args[0], "--agent", from.Agent()}, args[1:]...)...)
	}
	run := obx("run", "--node", from.Name, "--", "sh", "-c", script)
	stdout, err := run.StdoutPipe()
	if err != nil {
		return err
	}
	run.Stderr = out
	if err := run.Start(); err != nil {
		return err
	}
	defer func() {
		_ = run.Process.Kill()
		_ = run.Wait()
	}()
	var mu sync.Mutex
	last, gaps := 0, 0
	lines := make(chan struct{}, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			mu.Lock()
			fmt.Fprintf(out, "    | %s\n", sc.Text())
			var n int
			if _, err := fmt.Sscanf(sc.Text(), "count %d", &n); err == nil {
				if n != last+1 {
					gaps++
				}
				last = n
			}
			mu.Unlock()
			select {
			case lines <- struct{}{}:
			default:
			}
		}
	}()
	waitCount := func(n int) error {
		deadline := time.After(20 * time.Second)
		for {
			mu.Lock()
			l := last
			mu.Unlock()
			if l >= n {
				return nil
			}
			select {
			case <-lines:
			case <-deadline:
				return fmt.Errorf("demo: the counter stopped at %d", l)
			}
		}
	}
	if err := waitCount(4); err != nil {
		return err
	}
	ps := func() error {
		c := obx("ps")
		var b strings.Builder
		c.Stdout, c.Stderr = &b, &b
		err := c.Run()
		mu.Lock()
		for _, l := range strings.Split(strings.TrimRight(b.String(), "\n"), "\n") {
			fmt.Fprintf(out, "    %s\n", l)
		}
		mu.Unlock()
		return err
	}
	mu.Lock()
	fmt.Fprintln(out, "    onebox ps:")
	mu.Unlock()
	if err := ps(); err != nil {
		return err
	}
	c := obx("ps", "-o", "json")
	b, err := c.Output()
	if err != nil {
		return err
	}
	var l manager.ClusterList
	if err := json.Unmarshal(b, &l); err != nil {
		return err
	}
	gid := ""
	for _, p := range l.Procs {
		if p.State == manager.StateRunning && strings.Contains(strings.Join(p.Command, " "), "count $i") {
			gid = p.GID
		}
	}
	if gid == "" {
		return errors.New("demo: the counter is not in onebox ps")
	}
	mu.Lock()
	fmt.Fprintf(out, "    onebox migrate %s %s\n", gid, to.Name)
	mu.Unlock()
	b, err = obx("migrate", "-o", "json", gid, to.Name).Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return fmt.Errorf("demo: onebox migrate: %s", strings.TrimSpace(string(ee.Stderr)))
		}
		return err
	}
	var res migrate.Result
	if err := json.Unmarshal(b, &res); err != nil {
		return err
	}
	mu.Lock()
	fmt.Fprintf(out, "    moved %s -> %s: paused %.0f ms, done in %.0f ms (%s of memory followed after the restore)\n",
		res.From, res.To, res.DowntimeMS, res.TotalMS, size(uint64(res.PageBytes)))
	n := last
	mu.Unlock()
	if err := waitCount(n + 4); err != nil {
		return err
	}
	mu.Lock()
	fmt.Fprintln(out, "    onebox ps:")
	mu.Unlock()
	if err := ps(); err != nil {
		return err
	}
	mu.Lock()
	defer mu.Unlock()
	if gaps > 0 {
		return fmt.Errorf("demo: the counter skipped or repeated %d times", gaps)
	}
	fmt.Fprintf(out, "    the counter went on on %s without a gap; same id %s, same caller\n", to.Name, gid)
	_ = obx("kill", gid).Run()
	return nil
}
