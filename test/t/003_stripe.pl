# Stripe sync against the fake account in test/fake_stripe.py:
#   1. a newest-first backfill (limit=100, starting_after, ties of one `created` second
#      across page boundaries) copies every object of all seven collections exactly,
#      canceled subscriptions included;
#   2. creates, same-second updates (the last one wins), deletes, a subscription
#      cancellation and bulk creates of more than a 100-event page reach the tables;
#   3. an event cursor past Stripe's 30-day retention starts a backfill that sweeps
#      deletes, instead of silently skipping what happened meanwhile;
#   4. a revoked key (401, key never shown unmasked) and 429s are recorded, and the
#      worker recovers;
#   5. add_collection of an unknown collection fails at call time.
# Expected values come from the fake's own objects (GET /__admin/objects/<kind>).
use strict;
use warnings;
use utf8;

use FindBin;
use lib $FindBin::Bin;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use SyncTest;
use Test::More;
use Time::HiRes qw(time);

my $json = JSON::PP->new->utf8->canonical->allow_nonref;
my $node;    # set up below; start_fake, admin, sql, wait_until, status_of etc. are in SyncTest.pm

my @COLLECTIONS = qw(customers charges invoices subscriptions products prices payment_intents);
my %EVENT_PREFIX = (
	customers => 'customer', charges => 'charge', invoices => 'invoice',
	subscriptions => 'customer.subscription', products => 'product', prices => 'price',
	payment_intents => 'payment_intent');

# ---------------------------------------------------------------------------
# Helpers: the fake's request log
# ---------------------------------------------------------------------------

sub brief_entry
{
	my ($e) = @_;
	return "$e->{method} $e->{path}?" . ($e->{query} // '') . " -> $e->{status}";
}

# Stripe's masking of a key in error messages: first 8 characters, stars, last 4.
sub mask_key
{
	my ($k) = @_;
	return $k =~ /^rk_/ ? substr($k, 0, 8) . ('*' x (length($k) - 14)) . substr($k, -6)
	  : substr($k, 0, 8) . ('*' x (length($k) - 12)) . substr($k, -4);
}

# ---------------------------------------------------------------------------
# Helpers: the database
# ---------------------------------------------------------------------------

# A statement carrying a secret: kept out of the server log (log_statement = all in TAP
# clusters), so that the log can show whether the extension itself leaks the key.
sub secret_sql { return $node->safe_psql('postgres', "SET log_statement = 'none';\n$_[0]"); }

sub in_list
{
	my ($ids) = @_;
	return join(', ', map { "'$_'" } @$ids);
}

# ---------------------------------------------------------------------------
# Helpers: independent conversion of API values, and table comparison
# ---------------------------------------------------------------------------

sub is_json_number
{
	my ($v) = @_;
	return defined $v && !ref $v && JSON::PP->new->allow_nonref->encode($v) !~ /^"/;
}

# The expected value of an API field, as a comparable string.
sub expect_canon
{
	my ($type, $v) = @_;
	return 'NULL' unless defined $v;
	if ($type eq 'text')
	{
		return "bad-api-text:$v" if ref $v;
		return "s:$v";
	}
	return is_json_number($v) ? sprintf('n:%d', $v) : "bad-api-bigint:$v" if $type eq 'bigint';
	return JSON::PP::is_bool($v) ? 'b:' . ($v ? 'true' : 'false') : "bad-api-boolean:$v" if $type eq 'boolean';
	return 'j:' . $json->encode(canon($v)) if $type eq 'jsonb';
	return is_json_number($v) ? sprintf('e:%.3f', $v) : "bad-api-unix-time:$v" if $type eq 'unix_time';
	return $v =~ /^-?\d+(\.\d+)?$/ ? 'n:' . sprintf('%.15g', $v) : "bad-api-numeric:$v" if $type eq 'numeric';
	return "unknown-type:$type";
}

# The table's value (as rendered by json_agg, see select_expr) as a comparable string.
sub got_canon
{
	my ($type, $g) = @_;
	return 'NULL' unless defined $g;
	if ($type eq 'text')
	{
		return ref($g) ? 'bad:ref' : "s:$g";
	}
	return $g =~ /^-?\d+$/ ? sprintf('n:%d', $g) : "bad:$g" if $type eq 'bigint';
	return JSON::PP::is_bool($g) ? 'b:' . ($g ? 'true' : 'false') : "bad:$g" if $type eq 'boolean';
	return 'j:' . $json->encode(canon($g)) if $type eq 'jsonb';
	return sprintf('e:%.3f', $g) if $type eq 'unix_time';
	return $g =~ /^-?\d+(\.\d+)?$/ ? 'n:' . sprintf('%.15g', $g) : "bad:$g" if $type eq 'numeric';
	return "unknown-type:$type";
}

sub select_expr
{
	my ($f) = @_;
	my $col = qq{"$f->{column_name}"};
	my $t = $f->{api_type};
	my $expr =
	    ($t eq 'unix_time' || $t eq 'sync_version') ? "extract(epoch FROM $col)"
	  : $t eq 'numeric' ? "$col\::text"
	  : $col;
	return qq{$expr AS "$f->{api_field}"};
}

my %fields;    # collection -> [ sync.columns rows ]

sub fields_of
{
	my ($collection) = @_;
	return $json->decode(sql(
		"SELECT json_agg(json_build_object('api_field', api_field, 'api_type', api_type, "
		  . "'column_name', column_name, 'column_type', column_type, 'is_key', is_key, "
		  . "'is_version', is_version) ORDER BY position) "
		  . "FROM sync.columns WHERE source = 'billing' AND collection = '$collection'"));
}

sub table_rows
{
	my ($collection) = @_;
	return $json->decode(sql(
		"SELECT coalesce(json_agg(x ORDER BY x.id), '[]') FROM (SELECT "
		  . join(', ', map { select_expr($_) } @{ $fields{$collection} })
		  . " FROM billing.$collection) x"));
}

# Differences between a synced table and the fake's live objects, value by value.
sub diff_table
{
	my ($collection, $expected) = @_;
	my $rows = table_rows($collection);
	my %got = map { $_->{id} => $_ } @$rows;
	my %exp = map { $_->{id} => $_ } @$expected;
	my (@missing, @extra, @diff);
	my $values = 0;
	for my $id (sort keys %exp)
	{
		my $g = $got{$id};
		if (!$g)
		{
			push @missing, $id;
			next;
		}
		for my $f (@{ $fields{$collection} })
		{
			next if $f->{is_version};
			my $want = expect_canon($f->{api_type}, $exp{$id}{ $f->{api_field} });
			my $have = got_canon($f->{api_type}, $g->{ $f->{api_field} });
			$values++;
			push @diff, "$id $f->{api_field} ($f->{api_type}): table $have, API $want" if $have ne $want;
		}
	}
	for my $id (sort keys %got)
	{
		push @extra, $id unless $exp{$id};
	}
	return { rows => scalar(@$rows), got => \%got, missing => \@missing, extra => \@extra, diff => \@diff,
		values => $values, clean => !@missing && !@extra && !@diff && @$rows == keys %got };
}

sub compare_table
{
	my ($label, $collection, $expected) = @_;
	my $d = diff_table($collection, $expected);
	my @missing = @{ $d->{missing} };
	my @extra = @{ $d->{extra} };
	my @diff = @{ $d->{diff} };
	is($d->{rows}, scalar(@$expected), "$label: " . scalar(@$expected) . ' rows');
	is(scalar(keys %{ $d->{got} }), $d->{rows}, "$label: no id twice");
	is(scalar(@missing), 0, "$label: no API object missing from the table")
	  or diag(scalar(@missing) . " missing: @missing[0 .. ($#missing < 9 ? $#missing : 9)]");
	is(scalar(@extra), 0, "$label: no row the API does not have")
	  or diag(scalar(@extra) . " extra: @extra[0 .. ($#extra < 9 ? $#extra : 9)]");
	is(scalar(@diff), 0, "$label: all $d->{values} values equal the API's")
	  or diag(join("\n", @diff[0 .. ($#diff < 19 ? $#diff : 19)]));
	return $d->{got};
}

my $F;    # the fake

sub fake_objects { return admin($F, 'GET', "objects/$_[0]"); }

# Wait (bounded) until a table equals the fake, then compare it with assertions.
sub settle_and_compare
{
	my ($label, $collection, $timeout) = @_;
	my $objs;
	wait_until($timeout, sub {
			$objs = fake_objects($collection);
			diff_table($collection, $objs)->{clean};
		}, 1);
	return compare_table($label, $collection, $objs);
}

# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------

is(mask_key('sk_test_0123456789abcd'), 'sk_test_**********abcd', 'mask helper: Stripe masking');
is(expect_canon('unix_time', 1700000000), got_canon('unix_time', '1700000000.000000'),
	'conversion helpers: unix seconds vs extract(epoch)');

# Defaults: 500 customers (a burst of 150 sharing the oldest `created` second and one
# of 120 in the middle), 20 products, 40 prices, 200 subscriptions, 300 invoices,
# payment intents and charges; Stripe's sandbox rate limit of 25 requests/s.
$F = start_fake('stripe', 'main');
my $KEY = admin($F, 'GET', 'keys')->[0]{key};
like($KEY, qr/^sk_test_\w{20,}$/, 'the fake has its secret key');

$node = start_node(max_backoff => 4);    # and CREATE EXTENSION sync

# ---------------------------------------------------------------------------
# 1. Backfill of all seven collections
# ---------------------------------------------------------------------------

my %objs = map { $_ => fake_objects($_) } @COLLECTIONS;
is(scalar(@{ $objs{customers} }), 500, 'fake holds 500 live customers');
{
	# Preconditions: a run of one `created` second longer than a page, split by page boundaries.
	my @c = @{ $objs{customers} };
	my %per_second;
	$per_second{ $_->{created} }++ for @c;
	my ($biggest) = sort { $b <=> $a } values %per_second;
	cmp_ok($biggest, '>', 100, "customers: $biggest share one created second (more than a page)");
	my $split = grep { $c[ $_ * 100 - 1 ]{created} == $c[ $_ * 100 ]{created} } 1 .. int($#c / 100);
	cmp_ok($split, '>=', 1, "customers: $split page boundaries fall inside a run of one created second");
	my @canceled = grep { $_->{status} eq 'canceled' } @{ $objs{subscriptions} };
	cmp_ok(scalar(@canceled), '>', 0, scalar(@canceled) . ' canceled subscriptions in the fake');
	is(scalar(@{ admin($F, 'GET', 'events') }), 0, 'the fake starts without events');
}
admin($F, 'DELETE', 'requests');

secret_sql("SELECT sync.create_source('billing', 'stripe', '$F->{url}', '{\"secret_key\": \"$KEY\"}', "
	  . "'{\"requests_per_second\": 20, \"poll_interval\": 1}')");
my $t_add = time;
for my $c (@COLLECTIONS)
{
	is(sql("SELECT sync.add_collection('billing', '$c')"), "billing.$c", "add_collection creates billing.$c");
}
for my $c (@COLLECTIONS)
{
	is(sql("SELECT sync.wait_for_backfill('billing', '$c', '180s')"), 't', "$c: backfill completes");
}
my $t_backfilled = time;
note(sprintf('backfill of seven collections took %.1fs (at %s)', $t_backfilled - $t_add, elapsed()));

# The columns: the same fixed schema for every collection, typed as the API's type demands.
{
	my %want_type = (text => 'text', bigint => 'bigint', boolean => 'boolean', jsonb => 'jsonb',
		unix_time => 'timestamp with time zone', numeric => 'numeric',
		sync_version => 'timestamp with time zone');
	my %required = (
		customers => [qw(email name description phone currency balance delinquent address invoice_settings preferred_locales)],
		charges => [qw(amount amount_refunded currency customer status paid refunded outcome payment_method_details)],
		invoices => [qw(customer subscription status number amount_due amount_paid total paid period_start period_end lines)],
		subscriptions => [qw(customer status cancel_at_period_end canceled_at ended_at current_period_start current_period_end items)],
		products => [qw(name active updated default_price images)],
		prices => [qw(product active unit_amount unit_amount_decimal type recurring)],
		payment_intents => [qw(amount amount_received customer status latest_charge canceled_at last_payment_error)]);
	for my $c (@COLLECTIONS)
	{
		$fields{$c} = fields_of($c);
		my @f = @{ $fields{$c} };
		my %by = map { $_->{api_field} => $_ } @f;
		my @bad;
		for my $need (qw(id created livemode metadata), @{ $required{$c} })
		{
			push @bad, "no column for $need" unless $by{$need};
		}
		push @bad, 'id is not the key' unless $by{id} && $by{id}{is_key} && !grep { $_->{is_key} && $_ ne $by{id} } @f;
		push @bad, "created is $by{created}{api_type}" if $by{created} && $by{created}{api_type} ne 'unix_time';
		push @bad, "metadata is $by{metadata}{api_type}" if $by{metadata} && $by{metadata}{api_type} ne 'jsonb';
		push @bad, "livemode is $by{livemode}{api_type}" if $by{livemode} && $by{livemode}{api_type} ne 'boolean';
		my @version = grep { $_->{is_version} } @f;
		push @bad, 'version column: ' . join(',', map { $_->{column_name} } @version)
		  unless @version == 1 && $version[0]{column_name} eq '_updated_at';
		# Every API field named exists in the API's objects.
		my $sample = $objs{$c}[0];
		push @bad, map { "$_->{api_field} is not a field of a $c object" }
		  grep { !$_->{is_version} && !exists $sample->{ $_->{api_field} } } @f;
		my $actual = $json->decode(sql(
			"SELECT json_object_agg(attname, format_type(atttypid, atttypmod)) FROM pg_attribute "
			  . "WHERE attrelid = 'billing.$c'::regclass AND attnum > 0 AND NOT attisdropped"));
		for my $f (@f)
		{
			my $want = $want_type{ $f->{api_type} } // "?$f->{api_type}";
			my $have = $actual->{ $f->{column_name} } // 'no such column';
			push @bad, "$f->{api_field} ($f->{api_type}): column $have, want $want" if $have ne $want;
		}
		push @bad, "_synced_at is " . ($actual->{_synced_at} // 'missing')
		  unless ($actual->{_synced_at} // '') eq 'timestamp with time zone';
		is(scalar(@bad), 0, "$c: columns and types as the API's fields call for") or diag(join("\n", @bad));
	}
}

for my $c (@COLLECTIONS)
{
	my $st = status_of('billing', $c);
	is($st->{state}, 'syncing', "$c: state syncing after the backfill")
	  or diag("last_error: " . ($st->{last_error} // 'none'));
	is($st->{backfill_records}, scalar(@{ $objs{$c} }), "$c: backfill_records = " . scalar(@{ $objs{$c} }));
	my $got = compare_table("backfill of billing.$c", $c, $objs{$c});
	my @bad_time = grep { !defined $got->{$_}{_sync_updated}
		  || $got->{$_}{_sync_updated} < int($t_add) - 2 || $got->{$_}{_sync_updated} > $t_backfilled + 2 }
	  keys %$got;
	is(scalar(@bad_time), 0, "$c: _updated_at of backfilled rows is the time of the list read")
	  or diag("e.g. $bad_time[0]: " . ($got->{ $bad_time[0] }{_sync_updated} // 'NULL'));
}
{
	my @canceled = map { $_->{id} } grep { $_->{status} eq 'canceled' } @{ $objs{subscriptions} };
	is(sql("SELECT count(*) FROM billing.subscriptions WHERE status = 'canceled' AND id IN (" . in_list(\@canceled) . ')'),
		scalar(@canceled), 'canceled subscriptions were backfilled (status=all)');
}

# The requests: limit=100 pages walked with starting_after, after marking the event cursor.
{
	my $log = admin($F, 'GET', 'requests');
	my $limited = grep { $_->{status} == 429 } @$log;
	note("$limited requests of the backfill met the fake's rate limit of 25/s") if $limited;
	for my $c (@COLLECTIONS)
	{
		my @lists = grep { $_->{path} eq "/v1/$c" && (qparams($_)->{limit} // '') ne '1' } @$log;
		my @ok = grep { $_->{status} == 200 } @lists;
		is(scalar(grep { qparams($_)->{limit} ne '100' } @lists), 0, "$c: every list page asked for limit=100");
		if ($c eq 'subscriptions')
		{
			is(scalar(grep { (qparams($_)->{status} // '') ne 'all' } @lists), 0,
				'subscriptions: every list page asked for status=all');
		}
		my @ids = map { $_->{id} } @{ $objs{$c} };
		my $pages = @ids ? int((@ids + 99) / 100) : 1;
		my @want = ('-', map { $ids[ $_ * 100 - 1 ] } 1 .. $pages - 1);
		is(join(' ', map { qparams($_)->{starting_after} // '-' } @ok), join(' ', @want),
			"$c: $pages pages, each starting_after the last object of the page before");
		my $prefix = $EVENT_PREFIX{$c};
		my ($mark) = grep { $_->{path} eq '/v1/events' && (qparams($_)->{type} // '') eq "$prefix.*"
			  && (qparams($_)->{limit} // '') eq '1' && $_->{status} == 200 } @$log;
		ok($mark && @ok && $mark->{t} <= $ok[0]{t},
			"$c: the newest $prefix.* event was asked for before the first page");
	}
}
note('section 1 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 2. Changes after the backfill
# ---------------------------------------------------------------------------

# 2a. The very first events of a collection after a backfill that found no event
#     (cursor "since"): 120 charges created at once, more than a 100-event page.
{
	my $cur = cursor_of('billing', 'charges');
	ok(!defined $cur->{event} && defined $cur->{since}, 'charges: no event existed, the cursor is a time')
	  or diag($json->encode($cur));
	my $t_bulk = time;
	my $bulk = admin($F, 'POST', 'bulk/charges', { count => 120 });
	my $ids = in_list($bulk->{ids});
	my $all = wait_sql(30, "SELECT count(*) = 120 FROM billing.charges WHERE id IN ($ids)");
	my $n = sql("SELECT count(*) FROM billing.charges WHERE id IN ($ids)");
	ok($all, "charges: all 120 charges created at once after a 'since' cursor arrive ($n did)")
	  or diag("first event requests for charges after the bulk:\n" . join("\n", map { brief_entry($_) }
			grep { defined }
			(grep { $_->{t} >= $t_bulk && $_->{path} eq '/v1/events' && ($_->{query} // '') =~ /type=charge/ }
			@{ admin($F, 'GET', 'requests') })[0 .. 3]));
}

# 2b. Creates.
my $C1 = admin($F, 'POST', 'objects/customers',
	{ name => 'Zoë Created', email => 'zoe@example.com', metadata => { origin => 'tap' } })->{id};
my $C2 = admin($F, 'POST', 'objects/customers', { name => 'Second Created', description => 'start' })->{id};
ok(wait_sql(60, "SELECT count(*) = 2 FROM billing.customers WHERE id IN ('$C1', '$C2')"), 'created customers arrive');
is(sql_text("SELECT name || '|' || email || '|' || (metadata->>'origin') FROM billing.customers WHERE id = '$C1'"),
	'Zoë Created|zoe@example.com|tap', 'a created customer has its values');

# 2c. Several updates of one customer within ONE second (the fake's clock frozen), read
#     in one page: the final values must win.
sql("SELECT sync.pause('billing', 'customers')");
my $frozen = admin($F, 'POST', 'clock', { freeze => JSON::PP::true })->{now};
admin($F, 'PATCH', "objects/customers/$C1", { name => 'Same second 1', balance => 100 });
admin($F, 'PATCH', "objects/customers/$C2", { description => 'middle' });
admin($F, 'PATCH', "objects/customers/$C1",
	{ name => 'Same second 2', email => 'two@example.com', metadata => { tier => 'gold' } });
admin($F, 'PATCH', "objects/customers/$C1",
	{ name => 'Final name', balance => -250, delinquent => JSON::PP::true, metadata => { tier => '', note => 'last' },
	  address => { city => 'Kraków', country => 'PL', line1 => 'ul. Floriańska 12', line2 => undef,
		  postal_code => '30-001', state => undef } });
admin($F, 'PATCH', "objects/customers/$C2", { description => 'final' });
admin($F, 'POST', 'clock', { freeze => JSON::PP::false });
{
	my @upd = grep { $_->{data}{object}{id} eq $C1 || $_->{data}{object}{id} eq $C2 }
	  @{ admin($F, 'GET', 'events?type=customer.updated') };
	is(join(',', map { $_->{created} == $frozen ? 'same' : $_->{created} } @upd), 'same,same,same,same,same',
		'precondition: the five updates are events of one second');
}
my $t_resume = time;
sql("SELECT sync.resume('billing', 'customers')");
ok(wait_sql(60, "SELECT EXISTS (SELECT 1 FROM sync.status WHERE source = 'billing' AND collection = 'customers' "
		  . "AND last_caught_up_at > to_timestamp($t_resume))"), 'customers: caught up after the same-second updates');
is(sql_text("SELECT name || '|' || email || '|' || balance || '|' || delinquent || '|' || metadata::text "
		  . "|| '|' || (address->>'city') FROM billing.customers WHERE id = '$C1'"),
	'Final name|two@example.com|-250|true|{"note": "last", "origin": "tap"}|Kraków',
	'same-second updates: the last one wins');
is(sql("SELECT description FROM billing.customers WHERE id = '$C2'"), 'final',
	'same-second updates of another customer: the last one wins');
is(sql("SELECT extract(epoch FROM _updated_at)::bigint FROM billing.customers WHERE id = '$C1'"), $frozen,
	'_updated_at is the time of the event applied');

# 2d. Delete a customer that has a live subscription: the row goes, the subscription is canceled.
my %live_customer = map { $_->{id} => 1 } @{ fake_objects('customers') };
my @active_subs = grep { $_->{status} eq 'active' && $live_customer{ $_->{customer} } } @{ fake_objects('subscriptions') };
my $D1 = $active_subs[0]{customer};
my @d1_subs = map { $_->{id} }
  grep { $_->{customer} eq $D1 && $_->{status} ne 'canceled' && $_->{status} ne 'incomplete_expired' }
  @{ fake_objects('subscriptions') };
my ($S1) = map { $_->{id} } grep { $_->{customer} ne $D1 } @active_subs;
admin($F, 'DELETE', "objects/customers/$D1");
ok(wait_sql(60, "SELECT NOT EXISTS (SELECT 1 FROM billing.customers WHERE id = '$D1')"), 'a deleted customer is gone');
is(status_of('billing', 'customers')->{records_deleted}, 1, 'customers: records_deleted counts the deleted customer');
ok(wait_sql(60, "SELECT count(*) = " . scalar(@d1_subs) . " FROM billing.subscriptions WHERE status = 'canceled' "
		  . "AND id IN (" . in_list(\@d1_subs) . ')'),
	'the deleted customer\'s subscriptions are kept, canceled');

# 2e. Cancel a subscription: the row stays, with status canceled.
admin($F, 'DELETE', "objects/subscriptions/$S1");
ok(wait_sql(60, "SELECT EXISTS (SELECT 1 FROM billing.subscriptions WHERE id = '$S1' AND status = 'canceled' "
		  . "AND canceled_at IS NOT NULL AND ended_at IS NOT NULL)"), 'a canceled subscription is kept with status canceled');

# 2f. Products and prices: update, create, delete.
my ($prod) = grep { defined $_->{default_price} } @{ fake_objects('products') };
admin($F, 'PATCH', "objects/products/$prod->{id}", { name => 'Renamed plan', active => JSON::PP::false });
my $P = admin($F, 'POST', 'objects/products', { name => 'Temporary product' })->{id};
my $PR = admin($F, 'POST', 'objects/prices',
	{ product => $prod->{id}, unit_amount => 1234, unit_amount_decimal => '1234.5', nickname => 'Temporary' })->{id};
ok(wait_sql(60, "SELECT (SELECT count(*) FROM billing.products WHERE id = '$P') "
		  . "+ (SELECT count(*) FROM billing.prices WHERE id = '$PR' AND unit_amount_decimal = 1234.5) "
		  . "+ (SELECT count(*) FROM billing.products WHERE id = '$prod->{id}' AND name = 'Renamed plan' AND NOT active) = 3"),
	'a created product, a created price and an updated product arrive');
admin($F, 'DELETE', "objects/prices/$PR");
admin($F, 'DELETE', "objects/products/$P");
ok(wait_sql(60, "SELECT NOT EXISTS (SELECT 1 FROM billing.products WHERE id = '$P') "
		  . "AND NOT EXISTS (SELECT 1 FROM billing.prices WHERE id = '$PR')"), 'a deleted product and price are gone');
is(status_of('billing', 'products')->{records_deleted}, 1, 'products: records_deleted = 1');
is(status_of('billing', 'prices')->{records_deleted}, 1, 'prices: records_deleted = 1');

# 2g. 250 customers created in one second: three pages of events.
{
	my $bulk = admin($F, 'POST', 'bulk/customers', { count => 250 });
	ok(wait_sql(90, "SELECT count(*) = 250 FROM billing.customers WHERE id IN (" . in_list($bulk->{ids}) . ')'),
		'all 250 customers created in one second arrive');
	my @pages = grep { $_->{path} eq '/v1/events' && ($_->{query} // '') =~ /type=customer\.\*/
		  && defined qparams($_)->{ending_before} && $_->{t} >= $t_resume } @{ admin($F, 'GET', 'requests') };
	is(scalar(grep { qparams($_)->{limit} ne '100' } @pages), 0, 'event pages ask for limit=100');
}

settle_and_compare('billing.customers after the changes', 'customers', 60);
is(status_of('billing', 'customers')->{records_deleted}, 1, 'customers: still one row deleted');
settle_and_compare("billing.$_ after the changes", $_, 30) for qw(subscriptions products prices);
note('section 2 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 3. An event cursor past Stripe's 30-day retention: a backfill that sweeps deletes
# ---------------------------------------------------------------------------

sql("SELECT sync.pause('billing')");
# Let a step in flight finish: no request for 2 seconds.
ok(wait_until(30, sub {
		my $log = admin($F, 'GET', 'requests');
		!@$log || $log->[-1]{t} < time - 2;
	}, 0.5), 'the paused source makes no more requests');
my $old_cursor = cursor_of('billing', 'customers');
ok(defined $old_cursor->{event}, "customers: the cursor is an event ($old_cursor->{event})")
  or diag($json->encode($old_cursor));
my $inv_cursor = cursor_of('billing', 'invoices');
ok(!defined $inv_cursor->{event} && defined $inv_cursor->{since},
	'invoices: no invoice event ever, the cursor is a time') or diag($json->encode($inv_cursor));

my %live_now = map { $_->{id} => $_ } @{ fake_objects('customers') };
my ($D2) = grep { $_ ne $C1 && $_ ne $C2 } sort keys %live_now;
admin($F, 'DELETE', "objects/customers/$D2");
my $N3 = admin($F, 'POST', 'objects/customers', { name => 'Created while paused' })->{id};
admin($F, 'PATCH', "objects/customers/$C2", { name => 'Updated while paused' });
my $I3 = admin($F, 'POST', 'objects/invoices', { customer => $C1 })->{id};
my $clock = admin($F, 'POST', 'clock', { advance => 31 * 86400 });
cmp_ok($clock->{now}, '>', time + 30 * 86400, 'the fake\'s clock moved 31 days forward');
is(scalar(@{ admin($F, 'GET', 'events') }), 0, 'every event is past retention now');
admin($F, 'DELETE', 'requests');
my $deleted_before = status_of('billing', 'customers')->{records_deleted};

my $t_resume3 = time;
sql("SELECT sync.resume('billing')");
ok(wait_sql(120, "SELECT last_sweep_at IS NOT NULL FROM sync.status WHERE source = 'billing' AND collection = 'customers'"),
	'customers: a delete sweep completed after the retention loss');
ok(wait_sql(60, "SELECT state = 'syncing' FROM sync.status WHERE source = 'billing' AND collection = 'customers'"),
	'customers: syncing again');
like(slurp_file($node->logfile),
	qr/event cursor of collection "customers" is past Stripe's event retention; backfilling it again with a delete sweep/,
	'the server log tells of the retention loss');
{
	my $log = admin($F, 'GET', 'requests');
	my ($i) = grep { $log->[$_]{path} eq '/v1/events'
		  && (qparams($log->[$_])->{ending_before} // '') eq $old_cursor->{event} } 0 .. $#$log;
	ok(defined $i && $log->[$i]{status} == 400, 'the old event cursor answered 400 (No such event)')
	  or diag(defined $i ? brief_entry($log->[$i]) : 'cursor not asked for');
	my @relist = grep { $_->{path} eq '/v1/customers' && $_->{status} == 200 && defined $i && $_->{t} >= $log->[$i]{t} }
	  @$log;
	ok(@relist && !defined qparams($relist[0])->{starting_after}, 'then customers were listed again from the start')
	  or diag(@relist ? brief_entry($relist[0]) : 'no list');
}
my $st = status_of('billing', 'customers');
is(sql("SELECT count(*) FROM billing.customers WHERE id = '$D2'"), 0, 'the customer deleted while paused is gone');
is(sql("SELECT count(*) FROM billing.customers WHERE id = '$N3'"), 1, 'the customer created while paused is there');
is(sql("SELECT name FROM billing.customers WHERE id = '$C2'"), 'Updated while paused',
	'the update made while paused is there');
is($st->{records_deleted}, $deleted_before + 1, 'records_deleted counts the row the sweep deleted');
ok(defined $st->{last_sweep_at}, 'status: last_sweep_at is set');
my $n_customers = scalar(@{ fake_objects('customers') });
is($st->{backfill_records}, $n_customers, "status: backfill_records counts the new backfill ($n_customers)");

# Invoices had a time cursor, older than the retention now: the invoice created meanwhile
# has no event left; it must not be skipped silently.
ok(wait_sql(30, "SELECT EXISTS (SELECT 1 FROM billing.invoices WHERE id = '$I3')"),
	'invoices: an invoice created while paused, its event past retention, arrives (time cursor)')
  or diag('invoices cursor: ' . $json->encode(cursor_of('billing', 'invoices')) . '; last_sweep_at: '
	  . (status_of('billing', 'invoices')->{last_sweep_at} // 'null'));
for my $c (@COLLECTIONS)
{
	settle_and_compare("billing.$c after the retention loss", $c, $c eq 'customers' ? 30 : 10);
}
note('section 3 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 4. Errors are recorded, and the worker recovers
# ---------------------------------------------------------------------------

my $pid = sql('SELECT sync.worker_pid()');
ok($pid =~ /^\d+$/, "the worker runs (pid $pid)");

# A revoked key: 401, shown masked.
admin($F, 'DELETE', "keys/$KEY");
ok(wait_sql(60, "SELECT count(*) = 7 FROM sync.status WHERE source = 'billing' AND state = 'error' "
		  . "AND last_error LIKE '%HTTP 401%Invalid API Key provided%'"),
	'a revoked key shows as state error with the 401 in last_error, for every collection');
my $E1 = admin($F, 'POST', 'objects/customers', { name => 'During the outage' })->{id};
{
	my $status = sql("SELECT json_agg(s) FROM sync.status s");
	like($status, qr/\Q${\ mask_key($KEY)}\E/, 'last_error shows the key masked');
	ok(index($status, $KEY) < 0, 'the full key appears nowhere in sync.status');
	my $log = slurp_file($node->logfile);
	like($log, qr/HTTP 401.*Invalid API Key provided/, 'the server log tells of the 401');
	ok(index($log, $KEY) < 0, 'the full key appears nowhere in the server log');
}
my $KEY2 = admin($F, 'POST', 'keys', {})->{key};
my $t_fix = time;
secret_sql("SELECT sync.alter_source('billing', credentials => '{\"secret_key\": \"$KEY2\"}')");
# (alter_source resets consecutive_failures: wait for a successful poll after it)
ok(wait_sql(60, "SELECT count(*) = 7 FROM sync.status WHERE source = 'billing' AND state = 'syncing' "
		  . "AND consecutive_failures = 0 AND last_poll_at > to_timestamp($t_fix)"), 'a new key recovers every collection');
ok(wait_sql(60, "SELECT EXISTS (SELECT 1 FROM billing.customers WHERE id = '$E1' AND name = 'During the outage')"),
	'the customer created during the outage syncs');
{
	my $log = slurp_file($node->logfile);
	ok(index($log, $KEY2) < 0 && index(sql("SELECT json_agg(s) FROM sync.status s"), $KEY2) < 0,
		'the new key appears neither in the server log nor in sync.status');
}

# 429s from a fault on the customers' event polls.
admin($F, 'POST', 'faults', { path_regex => '^/v1/events\?.*type=customer\.\*', status => 429, count => 3 });
ok(wait_sql(60, "SELECT state = 'rate limited' AND consecutive_failures = 0 AND waiting_on LIKE 'rate limit: Stripe%' "
		  . "AND last_error LIKE '%HTTP 429%rate_limit%' "
		  . "FROM sync.status WHERE source = 'billing' AND collection = 'customers'"),
	'customers: a 429 shows as state rate limited (no error backoff) with rate_limit in last_error');
ok(wait_until(60, sub { admin($F, 'GET', 'faults')->[0]{remaining} == 0 }),
	'customers: each 429 penalty passed and the step was tried again until all three were served');
{
	my $t_served = time;
	ok(wait_sql(60, "SELECT state = 'syncing' AND consecutive_failures = 0 AND last_poll_at > to_timestamp($t_served) "
		  . "FROM sync.status WHERE source = 'billing' AND collection = 'customers'"), 'customers: back to syncing after the 429s');
}
is(join(',', map { "$_->{hits}/$_->{remaining}" } @{ admin($F, 'GET', 'faults') }), '3/0', 'all three 429s were served');
like(status_of('billing', 'customers')->{last_error} // '', qr/HTTP 429/, 'last_error keeps the 429 for the record');
cmp_ok(sql("SELECT rate_limited FROM sync.stat_collections WHERE source = 'billing' AND collection = 'customers'"),
	'>=', 3, 'sync.stat_collections counts the three 429s');
admin($F, 'DELETE', 'faults');

# 429s from the fake's own rate limiter, squeezed to 2 requests/s.
my $limited0 = admin($F, 'GET', 'rate_limit')->{limited};
my $t_squeeze = sql('SELECT now()');
admin($F, 'POST', 'rate_limit', { global => 2 });
my $E2 = admin($F, 'POST', 'objects/customers', { name => 'During the rate limit' })->{id};
ok(wait_sql(60, "SELECT count(*) > 0 FROM sync.status WHERE source = 'billing' AND state = 'rate limited' "
		  . "AND last_error LIKE '%HTTP 429%Testmode request rate limit exceeded%' AND last_error_at > '$t_squeeze'"),
	'the fake\'s rate limit shows as state rate limited with its 429');
ok(wait_until(60, sub { admin($F, 'GET', 'rate_limit')->{limited} > $limited0 }),
	'the fake refused requests over its limit');
admin($F, 'POST', 'rate_limit', { global => 25 });
my $t_restore = time;
ok(wait_sql(60, "SELECT count(*) = 7 FROM sync.status WHERE source = 'billing' AND state = 'syncing' "
		  . "AND consecutive_failures = 0 AND last_poll_at > to_timestamp($t_restore)"),
	'every collection recovers from the rate limit');
ok(wait_sql(60, "SELECT EXISTS (SELECT 1 FROM billing.customers WHERE id = '$E2')"),
	'the customer created under the rate limit syncs');
is(sql('SELECT sync.worker_pid()'), $pid, 'the same worker kept running through the errors');
note('section 4 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 5. An unknown collection fails at call time
# ---------------------------------------------------------------------------

{
	my ($stdout, $stderr) = ('', '');
	my $ret = $node->psql('postgres', "SELECT sync.add_collection('billing', 'coupons')",
		stdout => \$stdout, stderr => \$stderr);
	isnt($ret, 0, 'add_collection of an unknown collection fails');
	like($stderr, qr/Stripe has no collection "coupons"/, 'the error names the collection');
	like($stderr, qr/customers, charges, invoices, subscriptions, products, prices, payment_intents/,
		'the hint lists the collections there are');
	is(sql("SELECT to_regclass('billing.coupons') IS NULL AND (SELECT count(*) FROM sync.collections) = 7"), 't',
		'no table and no collection were created');
}

# ---------------------------------------------------------------------------
# The whole customers table once more
# ---------------------------------------------------------------------------

my $got = settle_and_compare('billing.customers at the end', 'customers', 30);
ok(!$got->{$D1} && !$got->{$D2} && $got->{$C1} && $got->{$N3} && $got->{$E1} && $got->{$E2},
	'deleted customers are gone, new ones present');
note('total ' . elapsed());
$node->stop;
done_testing();
