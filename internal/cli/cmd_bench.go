package cli

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/onebox-project/onebox/agent"
	fsbench "github.com/onebox-project/onebox/cfs/bench"
	"github.com/onebox-project/onebox/fabric/membership/bench"
)

func newBenchCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "bench",
		Short: "Measure parts of onebox on this machine",
		Args:  noArgs,
		// Without a subcommand, show what there is; an unknown one is a
		// usage error (noArgs), not help with exit status 0.
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	c.AddCommand(newBenchMembershipCmd(), newBenchFSCmd())
	c.AddCommand(procBenchCommands()...)
	c.AddCommand(memBenchCommands()...)
	c.AddCommand(poolBenchCommands()...)
	c.AddCommand(serviceBenchCommands()...)
	return c
}

func newBenchFSCmd() *cobra.Command {
	size := agent.ByteSize(fsbench.DefaultSize)
	var files int
	var noSSHFS bool
	c := &cobra.Command{
		Use:   "fs",
		Short: "Measure cluster filesystem throughput against local disk and sshfs",
		Long: `fs starts a 2-node cluster on loopback (as 'onebox dev --nodes 2' does) and
measures, on n2's exported scratch directory, one path after the other:

  local    the directory itself
  onebox   the same directory through n1's mount, n1/mnt/n2/scratch
  sshfs    the same directory through sshfs to a private sshd on 127.0.0.1
           (own port, host key and authorized key in a temporary directory;
           the system's sshd configuration and ~/.ssh are not used)

For each: a sequential write of --size (1 MiB writes, fsync at the end), sync
and a drop of the page cache (echo 3 > /proc/sys/vm/drop_caches), a sequential
read in 1 MiB reads, and --files small files created (create, write 4 KiB,
close). It prints MB/s, files/s and the ratios onebox/local and onebox/sshfs.
Needs root and /dev/fuse; the sshfs column needs sshfs and openssh-server
(apt-get install sshfs openssh-server) unless --no-sshfs. Every wait is
bounded; the cluster, sshd and the mounts are removed on every path out,
Ctrl-C included. Progress goes to stderr.`,
		Example: `  onebox bench fs
  onebox bench fs --size 512MiB --files 5000 -o json
  onebox bench fs --no-sshfs`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			format, err := outputFormat(cmd)
			if err != nil {
				return err
			}
			if size < fsbench.BlockSize || size > 64<<30 {
				return usagef("--size: %v is out of range (1MiB to 64GiB)", size)
			}
			if files < 1 || files > 1000000 {
				return usagef("--files: %d is out of range (1 to 1000000)", files)
			}
			if !noSSHFS {
				if err := fsbench.CheckSSHFS(); err != nil {
					return err
				}
			}
			start := time.Now()
			r, err := fsbench.Run(cmd.Context(), fsbench.Options{Size: int64(size), Files: files, NoSSHFS: noSSHFS, Log: cmd.ErrOrStderr()})
			if r != nil && len(r.Measures) > 0 {
				if format == "json" {
					if werr := writeJSON(cmd.OutOrStdout(), r); werr != nil && err == nil {
						err = werr
					}
				} else {
					fsbench.PrintTable(cmd.OutOrStdout(), r)
				}
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "bench: finished in %v\n", time.Since(start).Round(time.Second))
			return err
		},
	}
	c.Flags().Var(&size, "size", "size of the sequential file (e.g. 256MiB, 1GiB)")
	c.Flags().IntVar(&files, "files", fsbench.DefaultFiles, "number of 4 KiB files to create")
	c.Flags().BoolVar(&noSSHFS, "no-sshfs", false, "skip the sshfs comparison (no sshd or sshfs needed)")
	addOutputFlag(c)
	return c
}

func newBenchMembershipCmd() *cobra.Command {
	var nodes string
	c := &cobra.Command{
		Use:   "membership",
		Short: "Measure how fast gossip membership converges for clusters of N agents",
		Long: `membership starts N gossip members in this process, all on loopback with the
same gossip key (encryption on, memberlist LAN profile, as the agent uses),
and measures how long until every member agrees on membership:

  form        from the first join until all N see N alive members
  join        one more member joins; until all N+1 see it alive
  fail-first  one member crashes (no leave); until the first member suspects it
  fail-all    until every remaining member reports it failed
  leave       another member leaves gracefully; until all report it left

Failure figures are shown against memberlist's suspicion timeout for that
cluster size, the bound SWIM's failure detector promises. Every wait is bounded
(120 s) and reported as "timeout" if it runs out. Progress goes to stderr.`,
		Example: `  onebox bench membership
  onebox bench membership --nodes 10,50 -o json`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			format, err := outputFormat(cmd)
			if err != nil {
				return err
			}
			sizes, err := parseSizes(nodes)
			if err != nil {
				return err
			}
			start := time.Now()
			rs, err := bench.Run(cmd.Context(), sizes, cmd.ErrOrStderr())
			if len(rs) > 0 {
				if format == "json" {
					if werr := writeJSON(cmd.OutOrStdout(), rs); werr != nil && err == nil {
						err = werr
					}
				} else {
					bench.PrintTable(cmd.OutOrStdout(), rs)
				}
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "bench: finished in %v\n", time.Since(start).Round(time.Second))
			return err
		},
	}
	c.Flags().StringVar(&nodes, "nodes", "10,50,100", "comma-separated cluster sizes to measure")
	addOutputFlag(c)
	return c
}

func parseSizes(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 2 || n > 1000 {
			return nil, usagef("--nodes: %q is not a cluster size (2 to 1000)", f)
		}
		out = append(out, n)
	}
	if len(out) == 0 {
		return nil, usagef("--nodes: no cluster size given")
	}
	return out, nil
}

// noArgs is cobra.NoArgs as a usage error (wrapArgs only covers the root's
// direct subcommands).
func noArgs(cmd *cobra.Command, args []string) error {
	if err := cobra.NoArgs(cmd, args); err != nil {
		return usageError{err}
	}
	return nil
}
