package cli

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	membench "github.com/onebox-project/onebox/memory/pager/bench"
	"github.com/onebox-project/onebox/testbed"
)

// memBenchCommands are 'onebox bench' subcommands of memory expansion.
func memBenchCommands() []*cobra.Command {
	var size int
	var noSwap bool
	var workloads []string
	c := &cobra.Command{
		Use:   "mem",
		Short: "Measure memory expansion against all-local memory and against swap to local disk",
		Long: `mem measures the pager of memory expansion on this machine, in one run:

  latency    a page fault served from the cluster pool (a program reading
             pages it evicted, in random order) against the raw 4 KiB
             request/response round trip over loopback TCP, the pool's own
             Load of a page, and the same fault served from memory (no
             network); the pager's share of a fault (Load, UFFDIO_COPY,
             eviction) is printed beside it
  workloads  seq (byte-wise checksum passes), scan (word-wise checksum passes,
             memory bound) and rand (read-modify-write of a word in a random
             page), with 100%, 50% and 25% of the footprint allowed local;
             throughput as a ratio to the 100% run, to the program run without
             onebox, and the ceiling any pager could reach here (from the
             pool's bulk Load rate and the raw round trip, same run)
  swap       the same workloads under a memory cgroup (v1) limited to the same
             local size plus 4 MiB, with a swap file on local disk: what a user
             would do instead (the pages swapped in and the cgroup's peak are
             reported: the limit held and swap was used)

The pager runs in this process, the pool is the cluster pool over two page
servers on 127.0.0.1 behind mutual TLS, two copies of each page; the workload
(memwork.c, embedded) is built with cc and run under the shim. Every run's
checksum must equal the plain run's. The swap file (/var/tmp) and the cgroup
are removed on every path out. Needs root and cc. Progress goes to stderr.`,
		Example: `  onebox bench mem
  onebox bench mem --size 512 -o json
  onebox bench mem --no-swap --workloads seq,scan`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			format, err := outputFormat(cmd)
			if err != nil {
				return err
			}
			if size < 64 || size > 16384 {
				return usagef("--size: %d MiB is out of range (64 to 16384)", size)
			}
			for _, w := range workloads {
				if w != "seq" && w != "scan" && w != "rand" {
					return usagef("--workloads: unknown workload %q (seq, scan, rand)", w)
				}
			}
			start := time.Now()
			r, err := membench.Run(cmd.Context(), membench.Options{SizeMiB: size, NoSwap: noSwap, Workloads: workloads,
				Log: cmd.ErrOrStderr()})
			if err != nil {
				return err
			}
			if format == "json" {
				err = writeJSON(cmd.OutOrStdout(), r)
			} else {
				membench.PrintTable(cmd.OutOrStdout(), r)
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "bench: finished in %v\n", time.Since(start).Round(time.Second))
			return err
		},
	}
	c.Flags().IntVar(&size, "size", 256, "workload footprint in MiB")
	c.Flags().BoolVar(&noSwap, "no-swap", false, "skip the swap-to-disk baseline (no swapon, no cgroup)")
	c.Flags().StringSliceVar(&workloads, "workloads", nil, "run only these workloads: seq, scan, rand (default all; the fault latency always runs)")
	addOutputFlag(c)
	return []*cobra.Command{c}
}

// demoMemory is the demo's memory expansion step: a program whose memory
// is larger than any node's donation runs with --memory-expand and a small
// local limit, and computes what it computes plainly.
func demoMemory(ctx context.Context, out io.Writer, cl *testbed.Cluster) error {
	const footprint, local = 640, "128MiB"
	say := func(f string, a ...any) { fmt.Fprintf(out, f+"\n", a...) }
	say("\n==> Memory expansion: a %d MiB program (each node donates 512 MiB) with at most %s of it on its node", footprint, local)
	if reason := memExpandMissing(); reason != "" {
		say("    skipped: %s", reason)
		return nil
	}
	// Pages live in 2 copies on nodes other than the program's: 640 MiB
	// needs 1280 MiB donated by the others, 3 nodes of 512 MiB.
	for len(cl.Nodes) < 4 {
		say("    adding a node: pages are kept in 2 copies on nodes other than the program's, so %d MiB needs 3 other donors", footprint)
		n, err := cl.AddNode(ctx)
		if err != nil {
			return err
		}
		say("    %s joined", n.Name)
	}
	dir, err := os.MkdirTemp("", "onebox-demo-mem-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	prog, err := membench.BuildMemwork(ctx, dir)
	if err != nil {
		return err
	}
	args := []string{"scan", strconv.Itoa(footprint), "1"}
	plain, err := exec.CommandContext(ctx, prog, args...).Output()
	if err != nil {
		return fmt.Errorf("demo: plain run: %w", err)
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	on := cl.Nodes[0]
	say("    onebox run --node %s --memory-expand --local-memory %s -- memwork %s", on.Name, local, strings.Join(args, " "))
	t0 := time.Now()
	cmd := exec.CommandContext(ctx, self, append([]string{"run", "--agent", on.Agent(), "--node", on.Name,
		"--memory-expand", "--local-memory", local, "--", prog}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	got, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("demo: onebox run --memory-expand: %w: %s", err, stderr.String())
	}
	sum := func(b []byte) string { // the word after "sum" (memwork prints "timed" first)
		f := strings.Fields(string(b))
		for i := 0; i+1 < len(f); i++ {
			if f[i] == "sum" {
				return f[i+1]
			}
		}
		return string(b)
	}
	say("    plain run:            checksum %s", sum(plain))
	say("    with memory expansion: checksum %s  (%.1fs, pages evicted to and fetched back from the other nodes)", sum(got), time.Since(t0).Seconds())
	if sum(got) != sum(plain) {
		return fmt.Errorf("demo: memory expansion computed %s, the plain run %s", sum(got), sum(plain))
	}
	say("    identical")
	return nil
}

// memExpandMissing says why memory expansion cannot run here, or "".
func memExpandMissing() string {
	if os.Geteuid() != 0 {
		return "needs root (userfaultfd)"
	}
	fd, _, e := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK, 0, 0)
	if e != 0 {
		return fmt.Sprintf("userfaultfd unavailable: %v", e)
	}
	unix.Close(int(fd))
	if _, err := exec.LookPath("cc"); err != nil {
		return "needs a C compiler (cc) to build the shim"
	}
	return ""
}
