package cli

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/onebox-project/onebox/cfs/fusefs"
	"github.com/onebox-project/onebox/fabric/membership"
)

// cfsCommands are the I/O aggregation verbs.
func cfsCommands() []*cobra.Command {
	return []*cobra.Command{newExportsCmd(), {
		// Started by the agent next to its FUSE mount: unmounts it when
		// the agent exits, even by SIGKILL (see cfs/fusefs/watchdog.go).
		Use:    fusefs.WatchdogCommand + " MOUNTPOINT MOUNT_ID",
		Hidden: true,
		Args:   cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := strconv.Atoi(args[1])
			if err != nil {
				return usagef("mount id %q: %v", args[1], err)
			}
			return fusefs.RunWatchdog(args[0], id, os.Stdin)
		},
	}}
}

// exportRow is one export of the cluster namespace.
type exportRow struct {
	Node     string `json:"node"`
	Name     string `json:"name"`
	Path     string `json:"path"` // on the node
	ReadOnly bool   `json:"read_only"`
	// RootSquash: root on other members acts as nobody there.
	RootSquash bool   `json:"root_squash"`
	Status     string `json:"status"` // the node's membership status
	Stale      bool   `json:"stale,omitempty"`
}

func newExportsCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "exports",
		Short: "List the directories nodes export to the cluster filesystem",
		Long: `exports lists every node's exported directories: what every agent's mount of
the cluster filesystem (/onebox unless --mount says otherwise) shows as
/onebox/NODE/EXPORT. It exits 1 if a live node did not answer (its last
known exports are shown, marked stale). See docs/filesystem.md.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			format, cl, err := readCommand(cmd)
			if err != nil {
				return err
			}
			nr, err := cl.Nodes(cmd.Context())
			if err != nil {
				return err
			}
			rows := []exportRow{}
			var missing []string
			for _, n := range nr.Nodes {
				live := n.Status == membership.StatusAlive || n.Status == membership.StatusSuspect
				if live && (n.Info == nil || n.Stale) {
					missing = append(missing, n.Name)
				}
				if n.Info == nil {
					continue
				}
				for _, e := range n.Info.Exports {
					rows = append(rows, exportRow{Node: n.Name, Name: e.Name, Path: e.Path, ReadOnly: e.ReadOnly, RootSquash: e.RootSquash, Status: string(n.Status), Stale: n.Stale})
				}
			}
			if format == "json" {
				err = writeJSON(cmd.OutOrStdout(), rows)
			} else {
				w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
				fmt.Fprintln(w, "NODE\tEXPORT\tACCESS\tPATH\tSTATUS")
				for _, r := range rows {
					access, status := "rw", r.Status
					if r.ReadOnly {
						access = "ro"
					}
					if r.RootSquash {
						access += ",root-squash"
					}
					if r.Stale {
						status += " (stale)"
					}
					fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", r.Node, r.Name, access, r.Path, status)
				}
				err = w.Flush()
			}
			if err == nil && len(missing) > 0 {
				err = errors.New("exports: no answer from " + fmt.Sprint(missing))
			}
			return err
		},
	}
	addOutputFlag(c)
	return c
}
