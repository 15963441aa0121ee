package cli

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

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
	c.AddCommand(newBenchMembershipCmd())
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
