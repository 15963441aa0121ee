package cli

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	membench "github.com/onebox-project/onebox/memory/pager/bench"
	"github.com/onebox-project/onebox/testbed"
)

// memBenchCommands are 'onebox bench' subcommands of memory expansion.
func memBenchCommands() []*cobra.Command {
	var size int
	var noSwap bool
	c := &cobra.Command{
		Use:   "mem",
		Short: "Measure memory expansion against all-local memory and against swap to local disk",
		Long: `mem measures the pager of memory expansion on this machine, in one run:

  latency    a page fault served from the pool (a program reading pages it
             evicted, in random order) against the raw 4 KiB request/response
             round trip over loopback TCP to the same page server
  workloads  seq (byte-wise checksum passes), scan (word-wise checksum passes,
             memory bound) and rand (read-modify-write of a word in a random
             page), with 100%, 50% and 25% of the footprint allowed local;
             throughput as a ratio to the 100% run and to the program run
             without onebox
  swap       the same workloads under a memory cgroup (v1) limited to the same
             local size plus 4 MiB, with a swap file on local disk: what a user
             would do instead

The pager runs in this process, the pool is a page server on 127.0.0.1 (plain
TCP; the cluster pool's mutual TLS is measured by 'onebox bench pool'), the
workload (memwork.c, embedded) is built with cc and run under the shim. Every
run's checksum must equal the plain run's. The swap file (/var/tmp) and the
cgroup are removed on every path out. Needs root and cc. Progress goes to
stderr.`,
		Example: `  onebox bench mem
  onebox bench mem --size 512 -o json
  onebox bench mem --no-swap`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			format, err := outputFormat(cmd)
			if err != nil {
				return err
			}
			if size < 64 || size > 16384 {
				return usagef("--size: %d MiB is out of range (64 to 16384)", size)
			}
			start := time.Now()
			r, err := membench.Run(cmd.Context(), membench.Options{SizeMiB: size, NoSwap: noSwap, Log: cmd.ErrOrStderr()})
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
	addOutputFlag(c)
	return []*cobra.Command{c}
}

// demoMemory is the demo's memory expansion step. Stub.
func demoMemory(_ context.Context, _ io.Writer, _ *testbed.Cluster) error { return nil }
