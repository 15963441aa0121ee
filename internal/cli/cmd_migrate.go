package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/onebox-project/onebox/fabric/api"
	"github.com/onebox-project/onebox/proc/migrate"
	"github.com/onebox-project/onebox/testbed"
)

// migrateCommands are the migration verbs (issue 4): migrate, and the
// hidden restore holder the agent starts (proc/migrate.HolderMain).
func migrateCommands() []*cobra.Command {
	holder := &cobra.Command{
		Use:                migrate.HolderCommand,
		Hidden:             true,
		DisableFlagParsing: true,
		Args:               cobra.ArbitraryArgs,
		RunE: func(_ *cobra.Command, args []string) error {
			os.Exit(migrate.HolderMain(args))
			return nil
		},
	}
	return []*cobra.Command{newMigrateCmd(), holder}
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
// the JSON answer into v; an error answer becomes the error.
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
	return json.Unmarshal(body, v)
}

// procBenchCommands are 'onebox bench' subcommands of the process space.
func procBenchCommands() []*cobra.Command { return nil }

// demoMigrate is the demo's migration step. Stub.
func demoMigrate(_ context.Context, _ io.Writer, _ *testbed.Cluster) error { return nil }
