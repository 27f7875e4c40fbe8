# The lag promise, measured end to end against the fake Salesforce org:
#   sync.status.est_max_lag = (sum over the source's active collections of their
#   average requests per polling cycle) / budget rate + poll_interval,
# and the time from a change in the API until it shows in the table stays within it.
#
# One source at requests_per_second 4, burst 1, batch_size 200; custom objects of
# 50 records each. For 1, 5 and 20 collections (the source is reused: collections
# are added), once every backfill is done and the collections have been caught up a
# few times:
#   1. ~10 changes at random moments per 3 polling cycles (at least 4 s), each timed
#      from the fake's answer to the PATCH until a persistent psql session (looking
#      every 25 ms) sees the new values; worst lag <= est_max_lag at the change + 1 s;
#   2. sync.status.lag of every collection, sampled every 0.5 s, < est_max_lag + 1 s;
#   3. est_max_lag follows the requests per cycle counted independently in the
#      fake's request log (within 20% for 5 collections) and grows with N.
# Steady state includes the periodic delete checks (getDeleted, default every 300 s),
# which start once a collection's delete window is 60 s old: the 20-collection
# measurement runs until every collection is past that point and two delete checks
# ran, and also changes a record right before a collection's delete check is due.
# LAG_SEED=n reproduces a run's random choices.
use strict;
use warnings;

use FindBin;
use lib $FindBin::Bin;
use IPC::Run;
use JSON::PP;
use List::Util qw(max min sum);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use SyncTest;
use Test::More;
use Time::HiRes qw(time usleep);

my $RATE = 4;
my $RECORDS = 50;
my $CHANGES = 10;
my $TICK = 0.025;    # seconds between two looks at the table
my $SAMPLE_EVERY = 0.5;    # seconds between two samples of sync.status.lag
my $DELETED_INTERVAL = 300;    # the source option's default: not set here
my $seed = $ENV{LAG_SEED} // int(rand(1_000_000));
srand($seed);
note "LAG_SEED=$seed";

my $json = JSON::PP->new->utf8->canonical->allow_nonref;
my $creds = '{"client_id": "test-client", "client_secret": "test-secret", "refresh_token": "test-refresh"}';
my $node;    # set up below; start_fake, admin, sql, wait_sql, soql_of etc. are in SyncTest.pm

# ---------------------------------------------------------------------------
# Helpers: the fake's request log
# ---------------------------------------------------------------------------

# (kind, object) of a logged API request: kind is queryAll (a poll), query (a
# backfill or sweep), more (a nextRecordsUrl page), deleted (getDeleted),
# describe, token or other.
sub classify_request
{
	my ($e) = @_;
	my $p = $e->{path};
	return ('token', undef) if $p eq '/services/oauth2/token';
	if ($p =~ m{^/services/data/v[\d.]+/(query|queryAll)/?$})
	{
		my $kind = $1;
		my $soql = soql_of($e) // '';
		return ($kind, $soql =~ /\bFROM\s+(\w+)/i ? $1 : undef);
	}
	return ('more', undef) if $p =~ m{^/services/data/v[\d.]+/query/[A-Za-z0-9]+-\d+$};
	return ('deleted', $1) if $p =~ m{^/services/data/v[\d.]+/sobjects/(\w+)/deleted/?$};
	return ('describe', $1) if $p =~ m{^/services/data/v[\d.]+/sobjects/(\w+)/describe/?$};
	return ('other', undef);
}

# ---------------------------------------------------------------------------
# Helpers: the database
# ---------------------------------------------------------------------------

# A persistent psql session: the measuring loop must not pay for a connection per look.
my ($bg_h, $bg_timer);
my ($bg_in, $bg_out, $bg_err) = ('', '', '');
my $bg_n = 0;

# Runs before SyncTest's END, which kills the fakes.
END
{
	local $?;    # keep the test's exit status: reaping the psql session sets $?
	eval { $bg_h->kill_kill(grace => 3) if $bg_h; };
}

sub bg_start
{
	$bg_timer = IPC::Run::timeout(120);
	$bg_h = IPC::Run::start(
		[ 'psql', '-XAtq', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'), '-f', '-' ],
		'<', \$bg_in, '>', \$bg_out, '2>', \$bg_err, $bg_timer);
}

sub bq
{
	my ($query) = @_;
	my $tag = '__bq_' . ++$bg_n . '__';
	$bg_timer->start(120);
	$bg_in .= "$query;\n\\echo $tag\n";
	$bg_h->pump until $bg_out =~ /\Q$tag\E\n/ || $bg_err ne '';
	die "background psql failed on <$query>: $bg_err" if $bg_err ne '';
	my $out = $bg_out;
	$bg_out = '';
	$out =~ s/\Q$tag\E\n.*\z//s;
	chomp $out;
	return $out;
}

sub quantile
{
	my ($q, @v) = @_;
	@v = sort { $a <=> $b } @v;
	return undef unless @v;
	my $pos = $q * (@v - 1);
	my $lo = int($pos);
	my $hi = $lo + 1 < @v ? $lo + 1 : $lo;
	return $v[$lo] + ($v[$hi] - $v[$lo]) * ($pos - $lo);
}

# ---------------------------------------------------------------------------
# Setup: 20 custom objects in the fake, one source with a budget of 4 req/s
# ---------------------------------------------------------------------------

my $F = start_fake('salesforce', 'lag', '--records', '100');
my @objects = map { "Lag_${_}__c" } 1 .. 20;
my %record_ids;
for my $o (@objects)
{
	my $r = admin($F, 'POST', 'objects', { name => $o, records => $RECORDS });
	die "object $o: " . $json->encode($r) unless $r->{records} == $RECORDS;
	$record_ids{$o} = [ map { $_->{Id} } @{ admin($F, 'GET', "records/$o") } ];
}
is(scalar(@{ $record_ids{Lag_20__c} }), $RECORDS, "the fake holds $RECORDS records in each of 20 custom objects");

$node = start_node();    # and CREATE EXTENSION sync
sql("SELECT sync.create_source('lag', 'salesforce', '$F->{url}', '$creds', "
	  . "'{\"requests_per_second\": $RATE, \"burst\": 1, \"batch_size\": 200}')");
bg_start();

my %table;     # object -> target table
my %column;    # object -> api field -> column
my $active = 0;
my %used_record;
my (%est_of, %summary);

# Grow the source to $n collections and wait until the new ones are backfilled and
# every collection has been caught up a few times since.
sub grow_to
{
	my ($n) = @_;
	for my $i ($active + 1 .. $n)
	{
		my $o = $objects[ $i - 1 ];
		$table{$o} = sql("SELECT sync.add_collection('lag', '$o')");
	}
	$active = $n;
	ok( wait_sql(
			180,
			"SELECT count(*) = $n AND bool_and(phase = 'incremental' AND backfill_completed_at IS NOT NULL "
			  . "AND state = 'syncing') FROM sync.status WHERE source = 'lag'"),
		"$n collections: every backfill completes (" . elapsed() . ')')
	  or diag(sql("SELECT collection, state, phase, backfill_records, last_error FROM sync.status"));
	for my $i (1 .. $n)
	{
		my $o = $objects[ $i - 1 ];
		next if $column{$o};
		is(sql("SELECT count(*) FROM $table{$o}"), $RECORDS, "$n collections: $o backfilled with $RECORDS rows");
		for my $row (split /\n/,
			sql("SELECT api_field, column_name FROM sync.columns WHERE source = 'lag' AND collection = '$o'"))
		{
			my ($f, $c) = split /\|/, $row;
			$column{$o}{$f} = $c;
		}
	}
	# settled: each collection caught up in 3 full polling cycles after all backfills
	my $ready = sql("SELECT extract(epoch from now())");
	my $est = sql("SELECT max(extract(epoch from est_max_lag)) FROM sync.status WHERE source = 'lag'");
	ok( wait_sql(
			120,
			"SELECT bool_and(last_caught_up_at > to_timestamp($ready + 3 * $est)) "
			  . "FROM sync.status WHERE source = 'lag'"),
		sprintf('%d collections: every collection is caught up 3 polling cycles (%.3f s each) after the backfills (%s)',
			$n, $est, elapsed()))
	  or diag(sql("SELECT collection, state, last_caught_up_at, lag, est_max_lag FROM sync.status"));
}

# ---------------------------------------------------------------------------
# The measurement for one number of collections
# ---------------------------------------------------------------------------

# Change a random unused record of $o in the fake; returns the change.
sub make_change
{
	my ($n, $o, $k, $why) = @_;
	my @free = grep { !$used_record{$_} } @{ $record_ids{$o} };
	my $id = $free[ int(rand(@free)) ];
	$used_record{$id} = 1;
	my $name = "lag $n/$k " . int(rand(1e9));
	my $amount = sprintf('%.2f', 1 + rand(99999));
	my $est = bq("SELECT extract(epoch from est_max_lag) FROM sync.status WHERE source = 'lag' AND collection = '$o'");
	my $res = http()->request('PATCH', "$F->{url}/__admin/records/$o/$id",
		{ headers => { 'Content-Type' => 'application/json' },
		  content => $json->encode({ Name => $name, Amount__c => $amount + 0 }) });
	my $t_answer = time;
	die "PATCH $o/$id: $res->{status} $res->{content}" unless $res->{success};
	return { k => $k, object => $o, id => $id, name => $name, amount => $amount, why => $why,
		est => $est, t => $t_answer, modstamp => $json->decode($res->{content})->{SystemModstamp} };
}

# $until: measure at least until then; $delete_checks: also until that many delete
# checks ran and a change was made to a collection just before its delete check.
sub measure
{
	my ($n, $until, $delete_checks) = @_;
	my $est_now = bq("SELECT max(extract(epoch from est_max_lag)) FROM sync.status WHERE source = 'lag'");
	my $base = max(3 * $est_now, 4);
	my $window = max($base, ($until // 0) - time);
	my $nchanges = int($CHANGES * $window / $base + 0.5);
	my @plan = sort { $a <=> $b } map { rand($window) } 1 .. $nchanges;
	my (@changes, @samples, @sample_violations, @est_samples, %targeted);
	my $checks_seen = 0;

	admin($F, 'DELETE', 'requests');
	my $t0 = time;
	my $t0_db = bq("SELECT extract(epoch from now())");
	my $deadline = $t0 + $window + ($delete_checks ? 90 : 0) + $est_now + 30;
	my $next_tick = $t0;
	my $next_sample = $t0 + $SAMPLE_EVERY;
	while (time < $deadline)
	{
		my $now = time;
		if (@plan && $now - $t0 >= $plan[0])
		{
			shift @plan;
			push @changes, make_change($n, $objects[ int(rand($n)) ], scalar(@changes), 'random');
		}
		if ($now >= $next_sample)
		{
			$next_sample += $SAMPLE_EVERY;
			# lag, est_max_lag, when the collection was last stepped, and when its next
			# delete check is due (deleted_interval 300 s, delete window 60 s old)
			my $rows = bq("SELECT s.collection, extract(epoch from s.lag), extract(epoch from s.est_max_lag), "
				  . "extract(epoch from st.last_poll_at), "
				  . "greatest((st.cursor->>'deleted_at')::float8 + $DELETED_INTERVAL, "
				  . "         (st.cursor->>'deleted_until')::float8 + 60), "
				  . "(st.cursor->>'deleted_at')::float8 > $t0_db "
				  . "FROM sync.status s JOIN sync.sources so ON so.name = s.source "
				  . "JOIN sync.collections c ON c.source_id = so.id AND c.name = s.collection "
				  . "JOIN sync.collection_state st ON st.collection_id = c.id "
				  . "WHERE s.source = 'lag' ORDER BY s.collection");
			my @r = map { [ split /\|/ ] } split /\n/, $rows;
			push @samples, map { $_->[1] } @r;
			push @est_samples, $r[0][2];
			push @sample_violations, map { { object => $_->[0], lag => $_->[1], est => $_->[2], at => $now } }
			  grep { $_->[1] >= $_->[2] + 1 } @r;
			$checks_seen = grep { $_->[5] eq 't' } @r;
			# A change right after a collection's last poll before its delete check is due.
			if ($delete_checks && keys %targeted < 3)
			{
				for my $row (@r)
				{
					my ($o, $lag, $est, $stepped, $due) = @$row;
					next if $targeted{$o} || $now - $stepped > $SAMPLE_EVERY + 0.3;
					next unless $due > $stepped - 0.5 && $due < $stepped + 0.8 * $est;
					$targeted{$o} = 1;
					push @changes, make_change($n, $o, scalar(@changes),
						sprintf('delete check due in %.1f s', $due - time));
					last;
				}
			}
		}
		my @pending = grep { !defined $_->{seen} } @changes;
		if (@pending)
		{
			my $q = join ' UNION ALL ', map {
				my $c = $_;
				my $nm = $c->{name};
				$nm =~ s/'/''/g;
				"SELECT $c->{k} FROM $table{$c->{object}} WHERE id = '$c->{id}' "
				  . "AND $column{$c->{object}}{Name} = '$nm' "
				  . "AND $column{$c->{object}}{Amount__c} = $c->{amount}"
			} @pending;
			my $t_send = time;
			my $out = bq($q);
			# The values were not visible when the previous look was sent, and were
			# when this one was: t_send bounds the moment from above within a tick.
			for my $k (split /\n/, $out)
			{
				$changes[$k]{seen} = $t_send;
				$changes[$k]{lag} = $t_send - $changes[$k]{t};
			}
		}
		last
		  if !@plan
		  && time - $t0 >= $window
		  && (!$delete_checks || ($checks_seen >= $delete_checks && keys %targeted))
		  && !grep { !defined $_->{seen} } @changes;
		$next_tick += $TICK;
		my $sleep = $next_tick - time;
		if ($sleep > 0) { usleep(int($sleep * 1e6)); }
		else { $next_tick = time; }
	}
	my $t1 = time;
	my $log = [ sort { $a->{t} <=> $b->{t} } @{ admin($F, 'GET', 'requests') } ];
	my @seen = grep { defined $_->{lag} } @changes;
	is(scalar(@seen), scalar(@changes), "$n collections: all " . scalar(@changes) . ' changes reach their tables');
	if ($delete_checks)
	{
		ok($checks_seen >= $delete_checks && keys %targeted >= 1,
			"$n collections: the measurement saw $checks_seen delete checks, and "
			  . scalar(keys %targeted) . ' changes made just before one');
	}

	my @lags = map { $_->{lag} } @seen;
	my ($worst) = sort { ($b->{lag} - $b->{est}) <=> ($a->{lag} - $a->{est}) } @seen;
	my $p50 = quantile(0.5, @lags);
	my $lmax = max(@lags);
	my $est_mean = sum(map { $_->{est} } @changes) / @changes;
	diag(sprintf('%2d collections: est_max_lag %.3f s; change lag p50 %.3f s, max %.3f s (%d changes over %.1f s); '
		  . 'sync.status.lag sampled %d times, max %.3f s', $n, $est_mean, $p50 // -1, $lmax // -1,
		scalar(@changes), $window, scalar(@est_samples), max(@samples) // -1));
	for my $c (@changes)
	{
		my $line = sprintf('  change %d (%s): %s %s at +%.3f s (modstamp %s) est %.3f s lag %s', $c->{k}, $c->{why},
			$c->{object}, $c->{id}, $c->{t} - $t0, $c->{modstamp}, $c->{est},
			defined $c->{lag} ? sprintf('%.3f s', $c->{lag}) : 'never');
		$c->{why} eq 'random' ? note($line) : diag($line);
	}
	ok(defined $worst && @seen == @changes && $worst->{lag} <= $worst->{est} + 1,
		sprintf('%d collections: worst change lag %.3f s <= est_max_lag %.3f s + 1 s', $n,
			$worst ? $worst->{lag} : -1, $worst ? $worst->{est} : -1))
	  or explain_lag($worst, $log);
	ok(@est_samples >= 4 && !@sample_violations,
		sprintf('%d collections: sync.status.lag of every collection, sampled %d times, < est_max_lag + 1 s', $n,
			scalar(@est_samples)))
	  or explain_samples(\@sample_violations, $log);

	# Requests per polling cycle counted in the fake's log over the measurement window:
	# per collection, its requests divided by its polls (queryAll); requests no
	# collection can be told from (token, continuation pages) are spread over the polls.
	my (%req, %polls, %poll_times, %kinds);
	my $unattributed = 0;
	for my $e (@$log)
	{
		next if $e->{t} < $t0 || $e->{t} > $t1;
		my ($kind, $obj) = classify_request($e);
		$kinds{$kind}++;
		if (!defined $obj) { $unattributed++; next; }
		$req{$obj}++;
		if ($kind eq 'queryAll') { $polls{$obj}++; push @{ $poll_times{$obj} }, $e->{t}; }
	}
	my @active_objects = @objects[ 0 .. $n - 1 ];
	my $total_polls = sum(map { $polls{$_} // 0 } @active_objects) || 1;
	my $per_cycle = 0;
	my @gaps;
	for my $o (@active_objects)
	{
		my $p = $polls{$o} // 0;
		$per_cycle += $p ? ($req{$o} + $unattributed * $p / $total_polls) / $p : 1;
		my @t = @{ $poll_times{$o} // [] };
		push @gaps, map { $t[$_] - $t[ $_ - 1 ] } 1 .. $#t;
	}
	my $expected = $per_cycle / $RATE;
	my $est_sampled = sum(@est_samples) / @est_samples;
	diag(sprintf('%2d collections: %.2f requests per polling cycle in the fake\'s log -> %.3f s at %d req/s; '
		  . 'est_max_lag %.3f s; time between two polls of a collection: mean %.3f s, max %.3f s',
		$n, $per_cycle, $expected, $RATE, $est_sampled, @gaps ? sum(@gaps) / @gaps : -1, max(@gaps) // -1));
	diag(sprintf('%2d collections: requests in %.1f s: %s', $n, $t1 - $t0,
		join(', ', map { "$_ $kinds{$_}" } sort keys %kinds)));
	$est_of{$n} = $est_sampled;
	$summary{$n} = { expected => $expected, p50 => $p50, max => $lmax };
	return $expected;
}

# The requests the fake saw from $from to $to, times relative to $from: every request
# of $obj and every request that is no poll; polls of other collections are counted.
sub requests_between
{
	my ($obj, $from, $to, $log) = @_;
	my @between = grep { $_->{t} >= $from && $_->{t} <= $to } @$log;
	my $other_polls = grep {
		my ($k, $o) = classify_request($_);
		$k eq 'queryAll' && ($o // '') ne $obj
	} @between;
	diag(sprintf('  requests from %.3f to %.3f (%.3f s): %d, of which %d polls of other collections, and:',
		$from, $to, $to - $from, scalar(@between), $other_polls));
	for my $e (@between)
	{
		my ($k, $o) = classify_request($e);
		next if $k eq 'queryAll' && ($o // '') ne $obj;
		diag(sprintf('    %+8.3f s  %-8s %-10s %s %s', $e->{t} - $from, $k, $o // '-', $e->{status}, $e->{path}));
	}
}

sub explain_samples
{
	my ($violations, $log) = @_;
	my (%worst, %count);
	for my $v (@$violations)
	{
		$count{ $v->{object} }++;
		$worst{ $v->{object} } = $v if !$worst{ $v->{object} } || $worst{ $v->{object} }{lag} < $v->{lag};
	}
	my @by_lag = sort { $b->{lag} <=> $a->{lag} } values %worst;
	diag(sprintf('%s: %d samples over, worst lag %.3f s with est_max_lag %.3f s at %.3f', $_->{object},
		$count{ $_->{object} }, $_->{lag}, $_->{est}, $_->{at})) for @by_lag;
	# the walk the lag counts from began at at - lag: show from just before it
	requests_between($_->{object}, $_->{at} - $_->{lag} - 0.3, $_->{at}, $log)
	  for @by_lag[ 0 .. min($#by_lag, 2) ];
}

sub explain_lag
{
	my ($c, $log) = @_;
	return unless $c;
	diag(sprintf('change %d of %s (record %s) answered at %.3f, visible at %s, est %.3f s',
		$c->{k}, $c->{object}, $c->{id}, $c->{t}, defined $c->{seen} ? sprintf('%.3f', $c->{seen}) : 'never', $c->{est}));
	my ($before) = reverse grep {
		my ($k, $o) = classify_request($_);
		$k eq 'queryAll' && ($o // '') eq $c->{object} && $_->{t} <= $c->{t}
	} @$log;
	requests_between($c->{object}, $before ? $before->{t} : $c->{t} - 10,
		defined $c->{seen} ? $c->{seen} : $c->{t} + 30, $log);
	diag(sql("SELECT s.collection, s.state, s.activity, s.last_caught_up_at, s.lag, s.est_max_lag, s.requests, "
		  . "st.avg_cycle_requests, st.cursor FROM sync.status s "
		  . "JOIN sync.collections c ON c.name = s.collection "
		  . "JOIN sync.collection_state st ON st.collection_id = c.id WHERE s.collection = '$c->{object}'"));
}

# ---------------------------------------------------------------------------
# 1, 5 and 20 collections
# ---------------------------------------------------------------------------

for my $n (1, 5, 20)
{
	grow_to($n);
	is(sql("SELECT requests_per_second || '/' || burst FROM sync.budgets WHERE source = 'lag'"),
		"$RATE/1", "$n collections: sync.budgets shows the budget of $RATE req/s, burst 1");
	# Steady state includes the periodic delete checks (getDeleted), which begin once a
	# collection's delete window is 60 s old: the last measurement lasts until every
	# collection is past that point, and two polling cycles more.
	my $until;
	if ($n == 20)
	{
		my ($last_start, $est) = split /\|/,
		  sql("SELECT extract(epoch from max(backfill_started_at)), max(extract(epoch from est_max_lag)) "
			  . "FROM sync.status WHERE source = 'lag'");
		$until = $last_start + 60 + 2 * $est + 5;
	}
	measure($n, $until, $n == 20 ? 2 : 0);
}

# est_max_lag follows the requests per cycle and grows with the number of collections.
{
	my $want5 = $summary{5}{expected};
	ok(abs($est_of{5} - $want5) <= 0.2 * $want5,
		sprintf('5 collections: est_max_lag %.3f s within 20%% of 5 x (requests per cycle) / %d = %.3f s',
			$est_of{5}, $RATE, $want5));
	ok($est_of{1} < $est_of{5} && $est_of{5} < $est_of{20},
		sprintf('est_max_lag grows with the collections: %.3f s (1) < %.3f s (5) < %.3f s (20)',
			$est_of{1}, $est_of{5}, $est_of{20}));
	ok($est_of{20} >= 3 * $est_of{5} && $est_of{20} <= 5 * $est_of{5},
		sprintf('20 collections cost about 4 times what 5 do: %.3f s vs %.3f s', $est_of{20}, $est_of{5}));
}

for my $n (1, 5, 20)
{
	diag(sprintf('summary: %2d collections  est_max_lag %.3f s  lag p50 %.3f s  max %.3f s', $n, $est_of{$n},
		$summary{$n}{p50} // -1, $summary{$n}{max} // -1));
}
diag('runtime ' . elapsed());

$node->stop;
done_testing();
